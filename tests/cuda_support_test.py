"""cuda_support: what a build lacks to update on a GPU; the build's stop.

All of it runs on the CPU: the architecture verdicts and the messages are
pure functions; a GPU state is refused before anything is allocated; the
build's stop is checked by configuring the project (CMake only, nothing is
compiled) with a CUDA compiler that does not work and a JAX CUDA plugin's
metadata where the build's Python finds it.
"""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

from optax_paged._src import cuda_support
from optax_paged._src import ffi
from optax_paged._src import registry
from tests import background

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The module imported, which is also what the build runs: an installed
# wheel's where the tests run against one (scripts/gpu_wheel_check.sh).
SCRIPT = pathlib.Path(cuda_support.__file__)
REASON = 'no working CUDA compiler (nvcc) was found at build time'


class FakeGpu:
  """What the registry and ffi.gpu_missing read of a JAX CUDA device."""

  platform = 'gpu'

  def __init__(self, kind: str, capability: str):
    self.device_kind = kind
    self.compute_capability = capability


@pytest.mark.parametrize('entry, capability, runs', [
    # Machine code: its own major version, the same or a later minor one.
    ('80-real', '8.0', True), ('80-real', '8.6', True),
    ('80-real', '8.9', True), ('80-real', '9.0', False),
    ('80-real', '7.5', False), ('86-real', '8.0', False),
    # Machine code and PTX: PTX is compiled for any later GPU.
    ('90', '9.0', True), ('90', '10.0', True), ('90', '12.1', True),
    ('90', '8.9', False),
    ('90-virtual', '12.0', True), ('90-virtual', '8.6', False),
    # Architecture-specific: that GPU only, PTX included.
    ('90a', '9.0', True), ('90a', '10.0', False), ('90a-real', '9.0', True),
    # Family-specific: its major version, the same or a later minor one.
    ('100f', '10.0', True), ('100f', '10.3', True), ('100f', '12.0', False),
    ('100f', '9.0', False), ('103f', '10.0', False),
    # The wheel's newest entry: machine code for 12.1, PTX for later GPUs.
    ('121', '12.1', True), ('121', '13.0', True), ('121', '12.0', False),
])
def test_runs_on_one_entry(entry, capability, runs):
  assert cuda_support.runs_on([entry], capability) is runs


def test_runs_on_a_list_and_what_it_cannot_judge():
  wheel = ['80-real', '86-real', '89-real', '90-real', '100-real',
           '120-real', '121']
  for capability in ('8.0', '8.6', '8.7', '8.9', '9.0', '10.0', '10.3',
                     '12.0', '12.1', '13.0'):
    assert cuda_support.runs_on(wheel, capability) is True, capability
  assert cuda_support.runs_on(wheel, '7.5') is False
  assert cuda_support.runs_on(['90a', '100a'], '10.3') is False
  # CMake's names for lists it picks (and a capability JAX did not give)
  # are not judged: nothing is refused.
  assert cuda_support.runs_on(['native'], '9.0') is None
  assert cuda_support.runs_on(['80-real', 'all-major'], '7.5') is None
  assert cuda_support.runs_on(['native', '90'], '9.0') is True
  assert cuda_support.runs_on(['90'], '') is None
  assert cuda_support.runs_on([], '9.0') is None


def test_build_stop_message_with_and_without_plugins():
  assert cuda_support.build_stop_message(REASON, []) is None
  assert cuda_support.build_stop_message(REASON, [], None) is None
  plugins = ['jax-cuda13-plugin 0.11.2', 'jax-cuda13-pjrt 0.11.2']
  message = cuda_support.build_stop_message(REASON, plugins)
  assert message == (
      'optax_paged: JAX has a CUDA backend here (jax-cuda13-plugin 0.11.2, '
      f'jax-cuda13-pjrt 0.11.2), but {REASON}: this build would have no GPU '
      'kernels and would refuse the GPU. To update on the GPU, '
      f'{cuda_support.GET_THE_GPU_BUILD}. To build for the CPU only on '
      'purpose, pass -C cmake.define.OPTAX_PAGED_CUDA=OFF to pip install.'
  )
  # A build isolated in an environment of its own sees no plugin; the
  # driver stops it as well.
  driver = 'NVRM version: NVIDIA UNIX x86_64 Kernel Module 580.65.06'
  message = cuda_support.build_stop_message(REASON, [], driver)
  assert message.startswith(
      f'optax_paged: this machine has an NVIDIA driver ({driver}), but '
      f'{REASON}: ')
  assert 'OPTAX_PAGED_CUDA=OFF' in message


def test_the_readme_shows_the_stop_as_the_build_prints_it():
  readme = (ROOT / 'README.md').read_text()
  shown = re.search(r'```text\n(optax_paged: JAX has a CUDA backend.*?)```',
                    readme, re.S)
  assert shown, 'README, Install: the build\'s stop message'
  assert ' '.join(shown.group(1).split()) == cuda_support.build_stop_message(
      REASON, ['jax-cuda13-plugin 0.11.2', 'jax-cuda13-pjrt 0.11.2'])


def test_nvidia_driver_reads_the_version_file(tmp_path):
  version_file = tmp_path / 'version'
  assert cuda_support.nvidia_driver(version_file) is None
  version_file.write_text(
      'NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul\n'
      'GCC version:  gcc version 12.2.0\n')
  assert cuda_support.nvidia_driver(version_file) == (
      'NVRM version: NVIDIA UNIX x86_64 Kernel Module 580.65.06 Sun Jul')


def test_gpu_missing():
  h100 = ('NVIDIA H100 80GB HBM3', '9.0')
  # Built without CUDA: the reason, whatever the GPUs.
  message = cuda_support.gpu_missing(REASON, None, [h100])
  assert message == (
      f'optax_paged was built without its CUDA kernels because {REASON}, '
      f'so it cannot update on a GPU: {cuda_support.GET_THE_GPU_BUILD}.')
  assert cuda_support.gpu_missing(REASON, None, []) == message
  # Built with CUDA, but JAX has no GPU.
  assert cuda_support.gpu_missing(None, ['90'], []) == (
      f'{cuda_support.NO_GPU}.')
  # Built for other GPUs.
  assert cuda_support.gpu_missing(None, ['80-real', '90a'], [
      h100, ('NVIDIA B200', '10.0')]) == (
          "optax_paged's CUDA kernels were built for 80-real;90a, which does "
          'not run on this GPU (NVIDIA B200, compute capability 10.0): '
          'install a wheel built for it, or reinstall from source with -C '
          'cmake.define.CMAKE_CUDA_ARCHITECTURES=100.')
  assert cuda_support.gpu_missing(None, ['80-real', '90'], [h100]) is None
  assert cuda_support.gpu_missing(None, ['native'], [h100]) is None


def test_this_build_says_what_it_lacks():
  extension = ffi.extension()
  if extension.WITH_CUDA:
    assert extension.CPU_ONLY_REASON is None
    assert ffi.gpu_missing([FakeGpu('test GPU', '7.0')]) == (
        cuda_support.gpu_missing(None, ffi.cuda_architectures(),
                                 [('test GPU', '7.0')]))
  else:
    assert extension.CPU_ONLY_REASON
    assert ffi.gpu_missing([FakeGpu('test GPU', '9.0')]).startswith(
        'optax_paged was built without its CUDA kernels because '
        f'{extension.CPU_ONLY_REASON}')


@pytest.mark.parametrize('cpu_only_reason, architectures', [
    (None, '100a'), (REASON, None)])
def test_a_gpu_state_is_refused_with_what_is_missing(
    monkeypatch, cpu_only_reason, architectures):
  extension = ffi.extension()
  monkeypatch.setattr(extension, 'CPU_ONLY_REASON', cpu_only_reason)
  monkeypatch.setattr(extension, 'CUDA_ARCHITECTURES', architectures)
  gpu = FakeGpu('NVIDIA H100 80GB HBM3', '9.0')
  expected = cuda_support.gpu_missing(
      cpu_only_reason, architectures and [architectures],
      [(gpu.device_kind, gpu.compute_capability)])
  assert expected
  layout = registry.LeafLayout('', (4096,), jax.numpy.dtype('float32'),
                               True, True)
  with pytest.raises(RuntimeError) as refused:
    registry.REGISTRY.create('adamw', 2, 'cuda', jax.tree.structure(0),
                             [layout], [gpu], None, paged=True)
  assert str(refused.value) == expected


def _fake_plugin(site: pathlib.Path) -> None:
  """The metadata pip leaves for jax[cuda13]'s plugin, and nothing else."""
  info = site / 'jax_cuda13_plugin-0.11.2.dist-info'
  info.mkdir(parents=True)
  (info / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: jax-cuda13-plugin\nVersion: 0.11.2\n')


def test_the_script_prints_the_stop_where_a_plugin_is_installed(tmp_path):
  # As CMakeLists.txt runs it, but with -S and PYTHONPATH: this interpreter's
  # own packages stay out, the temporary folder's plugin is seen.
  def run(path):
    return subprocess.run(
        [sys.executable, '-S', '-P', str(SCRIPT), REASON], check=True,
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=path))

  driver = cuda_support.nvidia_driver()
  assert run(str(tmp_path)).stdout.strip() == (
      cuda_support.build_stop_message(REASON, [], driver) or '')
  _fake_plugin(tmp_path)
  assert run(str(tmp_path)).stdout.strip() == (
      cuda_support.build_stop_message(
          REASON, ['jax-cuda13-plugin 0.11.2'], driver))


def _configure(with_plugin: bool) -> subprocess.CompletedProcess | None:
  """CMake's configure step of this project, nothing compiled.

  Its Python is a venv that sees this one's packages (a .pth) and, with
  ``with_plugin``, a JAX CUDA plugin's metadata; CUDACXX names a compiler
  that does not work. None where cmake or nanobind is not installed or the
  source is not here (the tests run against an installed wheel).
  """
  cmake = shutil.which('cmake')
  source = (ROOT / 'CMakeLists.txt').is_file() and (
      ROOT / 'optax_paged' / '_src').is_dir()
  if cmake is None or not source or importlib.util.find_spec(
      'nanobind') is None:
    return None
  import nanobind  # a build requirement, imported where it is installed
  with tempfile.TemporaryDirectory() as tmp:
    venv = pathlib.Path(tmp) / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv],
                   check=True)
    python = venv / 'bin' / 'python'
    purelib = 'import sysconfig; print(sysconfig.get_path("purelib"))'
    site = pathlib.Path(subprocess.run(
        [python, '-c', purelib], check=True, capture_output=True,
        text=True).stdout.strip())
    (site / 'this_venv.pth').write_text(''.join(
        f'{path}\n' for path in sys.path
        if path.endswith(('site-packages', 'dist-packages'))))
    if with_plugin:
      _fake_plugin(site)
    env = dict(os.environ, CUDACXX='/bin/false')
    return background.run(
        [cmake, '-S', str(ROOT), '-B', str(pathlib.Path(tmp) / 'build'),
         f'-DPython_EXECUTABLE={python}',
         f'-Dnanobind_DIR={nanobind.cmake_dir()}'],
        timeout=180, env=env)


def _configure_job(with_plugin: bool):
  return lambda: _configure(with_plugin)


@pytest.mark.parametrize('with_plugin', [True, False])
def test_configure_without_nvcc(with_plugin):
  result = background.result(f'cuda-support-configure-{with_plugin}',
                             _configure_job(with_plugin))
  if result is None:
    pytest.skip('no cmake or nanobind, or no source tree to configure')
  output = ' '.join((result.stdout + result.stderr).split())
  # A machine whose own Python has a CUDA plugin, or that has a driver (the
  # GPU machine), stops either way.
  found = cuda_support.installed_plugins() or cuda_support.nvidia_driver()
  if not found and with_plugin:
    assert result.returncode != 0, output[-2000:]
    stop = cuda_support.build_stop_message(REASON,
                                           ['jax-cuda13-plugin 0.11.2'])
    assert stop in output, output[-2000:]
  elif found:
    assert result.returncode != 0, output[-2000:]
    assert (f'but {REASON}: this build would have no GPU kernels and would '
            'refuse the GPU.') in output, output[-2000:]
  else:
    # No plugin, no driver: the CPU build goes on and says why.
    assert result.returncode == 0, output[-2000:]
    assert f'optax_paged: {REASON}; building the CPU handlers only' in output


# The two configure runs go beside the other tests (tests/background.py).
BACKGROUND_JOBS = {
    f'cuda-support-configure-{with_plugin}': (
        _configure_job(with_plugin), ['test_configure_without_nvcc'])
    for with_plugin in (True, False)
}
