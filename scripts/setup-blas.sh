#!/bin/sh
# Best effort: MLX's Linux CPU wheel uses a reference BLAS; OpenBLAS makes fp32 matmuls ~40x faster.
# `python -m rank` preloads it automatically when it is installed. Never fails the setup.
[ "$(uname -s)" = "Linux" ] || exit 0
for p in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib64/libopenblas.so.0; do
  [ -e "$p" ] && exit 0
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing OpenBLAS (Debian package libopenblas0-pthread) for fast CPU matmuls"
  (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ||
   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1)) ||
   echo "warning: could not install OpenBLAS; Orchard runs, but CPU inference will be slow"
else
  echo "note: install OpenBLAS for fast CPU inference (e.g. sudo apt-get install libopenblas0-pthread)"
fi
exit 0
