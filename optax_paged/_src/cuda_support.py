"""What this installation lacks to update on a CUDA GPU, in one sentence.

The build and the running package say the same thing: CMakeLists.txt runs
this file as a script when it finds no usable nvcc (it prints the message
that stops the build where JAX has a CUDA plugin or the machine an NVIDIA
driver), and ``build_info()`` and the first state made on a GPU use
``gpu_missing``. Standard library only: the build runs it before the
extension exists.
"""

import importlib.metadata
import pathlib
import re
import sys
from collections.abc import Iterable
from collections.abc import Sequence

# JAX's CUDA backends as the package index ships them (jax[cuda12],
# jax[cuda13]): the plugin and its PJRT library.
CUDA_PLUGINS = (
    'jax-cuda13-plugin',
    'jax-cuda13-pjrt',
    'jax-cuda12-plugin',
    'jax-cuda12-pjrt',
)
# The NVIDIA kernel driver says its version here, in a container too.
DRIVER_VERSION_FILE = pathlib.Path('/proc/driver/nvidia/version')
# The two ways to the CUDA kernels, as the README's Install section gives
# them.
GET_THE_GPU_BUILD = (
    'install the binary wheel, which needs only the NVIDIA driver '
    '(scripts/build_wheel.sh builds it on any machine with nvcc; README, '
    'Install), or reinstall from source with a CUDA 12 or 13 toolkit\'s nvcc '
    'on PATH (or CUDACXX set to it)'
)
NO_GPU = (
    'JAX sees no CUDA GPU here (jax.devices("gpu") finds none): install '
    'jax[cuda13] or jax[cuda12] on a machine with an NVIDIA GPU and driver'
)

# A CMAKE_CUDA_ARCHITECTURES entry: 90, 90-real (machine code only),
# 90-virtual (PTX only), 90a (this exact GPU), 100f (its family).
_ARCHITECTURE = re.compile(r'(\d+)([af]?)(?:-(real|virtual))?')


def installed_plugins(names: Iterable[str] = CUDA_PLUGINS) -> list[str]:
  """'name version' of each installed distribution among ``names``."""
  found = []
  for name in names:
    try:
      found.append(f'{name} {importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def nvidia_driver(version_file: pathlib.Path = DRIVER_VERSION_FILE
                  ) -> str | None:
  """The NVIDIA driver's version line, or None on a machine without one."""
  try:
    lines = version_file.read_text(errors='replace').splitlines()
  except OSError:
    return None
  return ' '.join(lines[0].split()) if lines else 'present'


def build_stop_message(reason: str, plugins: Sequence[str],
                       driver: str | None = None) -> str | None:
  """Why a build without the CUDA kernels stops, or None where it may go on.

  It stops where JAX has a CUDA plugin, and where the machine has an NVIDIA
  driver: a build in an isolated environment of its own (``python -m
  build``, uv) cannot see the plugins of the environment it installs into.

  Args:
    reason: why the build has no CUDA kernels, as CMakeLists.txt says it.
    plugins: the installed JAX CUDA plugins (``installed_plugins()``).
    driver: the NVIDIA driver's version line (``nvidia_driver()``).
  """
  if plugins:
    found = f'JAX has a CUDA backend here ({", ".join(plugins)})'
  elif driver:
    found = f'this machine has an NVIDIA driver ({driver})'
  else:
    return None
  return (
      f'optax_paged: {found}, but {reason}: this build would have no GPU '
      f'kernels and would refuse the GPU. To update on the GPU, '
      f'{GET_THE_GPU_BUILD}. To build for the CPU only on purpose, pass -C '
      'cmake.define.OPTAX_PAGED_CUDA=OFF to pip install.'
  )


def _code_runs(entry: str, capability: tuple[int, int]) -> bool | None:
  """Whether one CMake architecture entry runs on ``capability``.

  Machine code runs on its own major version at the same or a later minor
  one; PTX is compiled by the driver for its own or any later GPU. The 'a'
  forms run on their exact GPU only, 'f' on their family. None: an entry
  this cannot judge ('native', 'all', 'all-major').
  """
  match = _ARCHITECTURE.fullmatch(entry.strip())
  if match is None:
    return None
  number, suffix, kind = int(match.group(1)), match.group(2), match.group(3)
  built = (number // 10, number % 10)
  if suffix == 'a':
    return capability == built
  same_family = capability[0] == built[0] and capability[1] >= built[1]
  if suffix == 'f' or kind == 'real':
    return same_family
  # Both machine code and PTX (no suffix), or PTX alone.
  return capability >= built


def runs_on(architectures: Sequence[str], capability: str) -> bool | None:
  """Whether code built for ``architectures`` runs on a GPU.

  Args:
    architectures: CMAKE_CUDA_ARCHITECTURES entries, e.g. ['80-real', '90'].
    capability: the GPU's compute capability, e.g. '9.0'.

  Returns:
    True or False, or None where an entry or the capability cannot be read
    (then nothing is refused).
  """
  match = re.fullmatch(r'(\d+)\.(\d+)', str(capability).strip())
  if match is None:
    return None
  wanted = (int(match.group(1)), int(match.group(2)))
  verdicts = [_code_runs(entry, wanted) for entry in architectures]
  if not verdicts:
    return None
  if any(verdicts):
    return True
  return None if None in verdicts else False


def gpu_missing(
    cpu_only_reason: str | None,
    architectures: Sequence[str] | None,
    gpus: Sequence[tuple[str, str | None]],
) -> str | None:
  """What keeps this installation from updating on the GPU, or None.

  Args:
    cpu_only_reason: why the extension has no CUDA kernels, None when it
      has them.
    architectures: the CMAKE_CUDA_ARCHITECTURES entries it was built for.
    gpus: (name, compute capability) of each CUDA GPU JAX sees; empty when
      JAX has none.
  """
  if cpu_only_reason is not None:
    return (
        'optax_paged was built without its CUDA kernels because '
        f'{cpu_only_reason}, so it cannot update on a GPU: '
        f'{GET_THE_GPU_BUILD}.'
    )
  if not gpus:
    return f'{NO_GPU}.'
  for name, capability in gpus:
    if runs_on(architectures or [], capability or '') is False:
      major, _, minor = str(capability).partition('.')
      return (
          'optax_paged\'s CUDA kernels were built for '
          f'{";".join(architectures or [])}, which does not run on this GPU '
          f'({name}, compute capability {capability}): install a wheel built '
          'for it, or reinstall from source with -C '
          f'cmake.define.CMAKE_CUDA_ARCHITECTURES={major}{minor}.'
      )
  return None


if __name__ == '__main__':
  # CMakeLists.txt: argv[1] is why the build has no CUDA kernels; prints the
  # message that stops it, or nothing.
  message = build_stop_message(sys.argv[1], installed_plugins(),
                               nvidia_driver())
  if message:
    print(message)
