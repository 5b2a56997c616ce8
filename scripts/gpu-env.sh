# Sourced by the scripts/gpu-* entry points on the device machine (no cargo there): the
# library path for the machines' CUDA 13.0 and NCCL 2.28, NVLink multicast off, and the
# staged binaries. scripts/gpu-check stages them xz-compressed (.gpu/*.xz: the repo plus two
# stripped binaries would pass the device tool's 64 MiB carry limit); they are unpacked here
# once. Sets MOELAB_BIN (default .gpu/moelab).
#
#   source scripts/gpu-env.sh
sys_lib=/usr/lib/x86_64-linux-gnu
# cudarc looks for libnccl.so (not libnccl.so.2); where only the versioned file exists, a
# symlink in a scratch folder on LD_LIBRARY_PATH supplies the name.
mkdir -p /tmp/moelab-lib
{ [ -e $sys_lib/libnccl.so ] || [ ! -e $sys_lib/libnccl.so.2 ] || ln -sf $sys_lib/libnccl.so.2 /tmp/moelab-lib/libnccl.so; }
export NCCL_NVLS_ENABLE=0 LD_LIBRARY_PATH=/tmp/moelab-lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:$sys_lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
for packed in .gpu/*.xz; do
    [ -e "$packed" ] || continue
    unpacked="${packed%.xz}"
    if [ ! -x "$unpacked" ] || [ "$packed" -nt "$unpacked" ]; then
        xz -dc "$packed" > "$unpacked" && chmod +x "$unpacked"
    fi
done
export MOELAB_BIN="${MOELAB_BIN:-$PWD/.gpu/moelab}"
