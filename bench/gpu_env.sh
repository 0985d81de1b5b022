# Sourced by gpu_run.sh and gpu_check.sh on the GPU machine (copied beside them into `.gpu/`):
# the libraries the trainer and its test binary load. libtorch is PyTorch's; the trainer compiles
# its CUDA kernels with NVRTC, opened at run time: PyTorch's own copy (the nvidia-cuda-nvrtc
# package) or the toolkit's, whichever is found first.
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__)+"/lib")')
nvrtc=$(ls -d "$(python3 -c 'import site;print(site.getsitepackages()[0])')"/nvidia/*/lib/libnvrtc.so* \
  /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
[ -n "$nvrtc" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(dirname "$nvrtc")
