# Sourced by the launchers: preload tcmalloc, a memory allocator that makes PyTorch on the CPU faster
# here (it reuses the large activation buffers that glibc maps and unmaps every call; measured on a
# 2-core AMD EPYC, one full-size clip: int8 autoencoder encode 5.9 -> 4.7 s, decode 5.4 -> 4.1 s).
#   MODITALKER_TCMALLOC unset: use tcmalloc if it is installed (Debian/Ubuntu: libtcmalloc-minimal4;
#                              conda: gperftools), else nothing changes;
#   MODITALKER_TCMALLOC=0:     never;
#   MODITALKER_TCMALLOC=PATH:  that library (a missing file is a one-line error, exit 2).
# An LD_PRELOAD the user set is kept as it is.
_moditalker_tcmalloc() {
  local want="${MODITALKER_TCMALLOC:-}" lib
  [ "$want" = 0 ] && return 0
  [ -n "${LD_PRELOAD:-}" ] && return 0
  if [ -n "$want" ]; then
    if [ ! -f "$want" ]; then
      echo "error: MODITALKER_TCMALLOC=$want: no such file (set it to 0 to run without tcmalloc)" >&2
      exit 2
    fi
    export LD_PRELOAD="$want"
    return 0
  fi
  for lib in ${CONDA_PREFIX:+"$CONDA_PREFIX/lib/libtcmalloc_minimal.so.4"} \
    /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
    /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
    if [ -f "$lib" ]; then
      export LD_PRELOAD="$lib"
      return 0
    fi
  done
}
_moditalker_tcmalloc
