# Sourced by the README's two commands. libtpu (in .venv for the TPU compile
# tests) makes JAX try to open a TPU at start-up and print pages of errors
# where there is none before it falls back. Where the machine has no TPU
# device files, JAX is told to try the GPU, then the CPU; a JAX_PLATFORMS
# already set is kept.
if [ -z "${JAX_PLATFORMS+set}" ] && ! compgen -G '/dev/accel*' >/dev/null \
    && ! compgen -G '/dev/vfio/[0-9]*' >/dev/null; then
  export JAX_PLATFORMS=cuda,cpu
fi
