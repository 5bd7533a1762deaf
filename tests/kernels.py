"""CUDA C sources shared by the tests (real kernels, compiled for the CPU backend)."""
import numpy as np

VECADD = r"""
extern "C" __global__ void vadd(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
"""

SAXPY = r"""
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
"""

GRID2D = r"""
extern "C" __global__ void scale2d(const double* in, double* out, int rows, int cols, double k) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (r < rows && c < cols) out[r * cols + c] = in[r * cols + c] * k + r - c;
}
"""

SCALARS = r"""
extern "C" __global__ void widths(signed char a, unsigned char b, short c, unsigned short d,
                                  int e, unsigned int f, long long g, unsigned long long h,
                                  float x, double y, double* out) {
    out[0] = a; out[1] = b; out[2] = c; out[3] = d; out[4] = e;
    out[5] = f; out[6] = (double)g; out[7] = (double)h; out[8] = x; out[9] = y;
}
"""

SEGFAULT = r"""
extern "C" __global__ void crash(int* p) { *(volatile int*)0 = 1; p[0] = 2; }
"""

SPIN = r"""
extern "C" __global__ void spin(float* out, int iters) {
    float x = out[0];
    for (int i = 0; i < iters; i++) x = x * 0.999999f + 1e-7f;
    out[0] = x;
}
"""

# one atomic increment per block, after a spin: counts how many blocks ran
COUNT = r'''
extern "C" __global__ void inc(unsigned long long* c, int spin) {
    if (threadIdx.x == 0) { volatile int x = 0; for (int i = 0; i < spin; i++) x += i; atomicAdd(c, 1ULL); }
}
'''


def run_vadd(d, n: int = 1000) -> None:
    """VECADD on device `d`, checked (n = 100_000 copies through the staging segment)."""
    a = np.arange(n, dtype=np.float32)
    with d.allocate(a.nbytes) as da, d.allocate(a.nbytes) as dc:
        da.copy_from(a)
        k = d.load_module(VECADD).get_kernel("vadd")
        d.launch(k, ((n + 255) // 256,), (256,), [da, da, dc, np.int32(n)])
        np.testing.assert_array_equal(dc.copy_to(np.empty(n, np.float32)), a + a)
