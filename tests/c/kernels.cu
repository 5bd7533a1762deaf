// Kernels for tests/c/exec_tour.c, built by the test with nvcc -ptx and nvcc -fatbin and
// loaded through KubeCASH's libcuda.so.1 (tests/test_native_driver.py).
struct Affine { float scale; float shift; int count; };

__device__ float bias = 0.0f;     // set by the program with cuModuleGetGlobal + a copy
__device__ unsigned int hits;

extern "C" __global__ void vec_add(const float *a, const float *b, float *c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        c[i] = a[i] + b[i] + bias;
        atomicAdd(&hits, 1u);
    }
}

// Mixed parameter sizes and a struct: the extra (CU_LAUNCH_PARAM_BUFFER_POINTER) layout.
extern "C" __global__ void affine(char tag, double *out, Affine f, const float *in) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < f.count) out[i] = (double)in[i] * f.scale + f.shift + (double)tag;
}

// A device fault: the trap instruction (CUDA_ERROR_ILLEGAL_INSTRUCTION), sticky for the context.
extern "C" __global__ void boom(int *out) {
    if (threadIdx.x == 3) asm volatile("trap;");
    out[threadIdx.x] = 1;
}
