# On a GPU machine, from the repository root, with .whl carried (bench/gpu/make-bundle.sh built it):
#   source .whl/install.sh || exit
# Installs the bundle's wheels and the reference optimizers into .whl/site (no index, no
# dependencies resolved: the bundle is pinned) and sets the environment of the GPU benchmarks.
site="$PWD/.whl/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .whl/*.whl .whl/extra/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"
# NVLink multicast stays off on these shared hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# DeepSpeed's just-in-time op builder cannot parse arch names such as "9.0a" that the image sets;
# name the Hopper arch plainly.
export TORCH_CUDA_ARCH_LIST=9.0
