// CUDA graphs, as NVIDIA's simpleCudaGraphs uses them: one captured from a stream (a memset,
// copies both ways, two kernels, a host function), launched three times with new input each
// time; one built by hand (two dependent kernel nodes and a host node), launched, then one
// kernel node's parameters changed in the instantiated graph; a whole instantiated graph
// updated from a second capture of the same shape (cudaGraphExecUpdate), and refused from one
// of another shape; and a capture that a synchronization invalidates. Checked against host
// references.
#include "common.h"
__global__ void affine(float* x, float a, float b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * a + b;
}
static void CUDART_CB count(void* p) { ++*static_cast<int*>(p); }

int main() {
    const int n = 4096;
    float *in = new float[n], *out = new float[n], *d;
    CHECK(cudaMalloc(&d, n * sizeof(float)));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int calls = 0;
    cudaError_t err;

    // -- captured from a stream: nothing runs until the graph is launched
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cudaStreamIsCapturing(s, &st));
    EXPECT(st == cudaStreamCaptureStatusActive, "capture status %d", (int)st);
    CHECK(cudaMemsetAsync(d, 0, n * sizeof(float), s));
    CHECK(cudaMemcpyAsync(d, in, n * sizeof(float), cudaMemcpyHostToDevice, s));
    affine<<<n / 256, 256, 0, s>>>(d, 2.0f, 1.0f, n);
    affine<<<n / 256, 256, 0, s>>>(d, 3.0f, 1.0f, n);
    CHECK(cudaMemcpyAsync(out, d, n * sizeof(float), cudaMemcpyDeviceToHost, s));
    CHECK(cudaLaunchHostFunc(s, count, &calls));
    cudaGraph_t g;
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaStreamIsCapturing(s, &st));
    EXPECT(st == cudaStreamCaptureStatusNone && calls == 0, "status %d, %d calls during capture", (int)st, calls);
    size_t nodes = 0;
    CHECK(cudaGraphGetNodes(g, nullptr, &nodes));
    EXPECT(nodes == 6, "%zu nodes captured", nodes);
    cudaGraphExec_t e;
    CHECK(cudaGraphInstantiate(&e, g, 0));
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < n; i++) in[i] = float(i % 97 + round);   // read when the graph runs
        CHECK(cudaGraphLaunch(e, s));
        CHECK(cudaStreamSynchronize(s));
        for (int i = 0; i < n; i++) {
            float want = (float(i % 97 + round) * 2.0f + 1.0f) * 3.0f + 1.0f;
            EXPECT(out[i] == want, "round %d: out[%d] = %g, want %g", round, i, out[i], want);
        }
    }
    EXPECT(calls == 3, "the host function ran %d times", calls);
    calls = 0;

    // -- built by hand: kb after ka, the host node after kb
    cudaGraph_t g2;
    CHECK(cudaGraphCreate(&g2, 0));
    float a1 = 0.5f, b1 = 4.0f, a2 = 10.0f, b2 = -1.0f;
    int count_n = n;
    void *args1[] = {&d, &a1, &b1, &count_n}, *args2[] = {&d, &a2, &b2, &count_n};
    cudaKernelNodeParams kp = {};
    kp.func = reinterpret_cast<void*>(affine);
    kp.gridDim = dim3(n / 256);
    kp.blockDim = dim3(256);
    kp.kernelParams = args1;
    cudaGraphNode_t ka, kb, hn;
    CHECK(cudaGraphAddKernelNode(&ka, g2, nullptr, 0, &kp));
    kp.kernelParams = args2;
    CHECK(cudaGraphAddKernelNode(&kb, g2, &ka, 1, &kp));
    cudaHostNodeParams hp = {count, &calls};
    CHECK(cudaGraphAddHostNode(&hn, g2, &kb, 1, &hp));
    a1 = b1 = a2 = b2 = 0.0f;              // the nodes took the values when they were added
    cudaGraphExec_t e2;
    CHECK(cudaGraphInstantiate(&e2, g2, 0));
    for (int i = 0; i < n; i++) in[i] = float(i % 13);
    CHECK(cudaMemcpy(d, in, n * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaGraphLaunch(e2, s));
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaMemcpy(out, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++) {
        float want = (float(i % 13) * 0.5f + 4.0f) * 10.0f - 1.0f;
        EXPECT(out[i] == want, "explicit: out[%d] = %g, want %g", i, out[i], want);
    }
    EXPECT(calls == 1, "the host node ran %d times", calls);
    // the instantiated graph's second kernel changed; the graph itself keeps its own
    float a3 = 1.0f, b3 = 100.0f;
    void* args3[] = {&d, &a3, &b3, &count_n};
    kp.kernelParams = args3;
    CHECK(cudaGraphExecKernelNodeSetParams(e2, kb, &kp));
    CHECK(cudaMemcpy(d, in, n * sizeof(float), cudaMemcpyHostToDevice));
    CHECK(cudaGraphLaunch(e2, s));
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaMemcpy(out, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    for (int i = 0; i < n; i++) {
        float want = (float(i % 13) * 0.5f + 4.0f) + 100.0f;
        EXPECT(out[i] == want, "updated: out[%d] = %g, want %g", i, out[i], want);
    }

    // -- the captured graph again, other constants: the instantiated one updated in place
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cudaMemsetAsync(d, 0, n * sizeof(float), s));
    CHECK(cudaMemcpyAsync(d, in, n * sizeof(float), cudaMemcpyHostToDevice, s));
    affine<<<n / 256, 256, 0, s>>>(d, -1.0f, 0.5f, n);
    affine<<<n / 256, 256, 0, s>>>(d, 4.0f, 0.0f, n);
    CHECK(cudaMemcpyAsync(out, d, n * sizeof(float), cudaMemcpyDeviceToHost, s));
    CHECK(cudaLaunchHostFunc(s, count, &calls));
    cudaGraph_t g3;
    CHECK(cudaStreamEndCapture(s, &g3));
    cudaGraphExecUpdateResultInfo info = {};
    CHECK(cudaGraphExecUpdate(e, g3, &info));
    EXPECT(info.result == cudaGraphExecUpdateSuccess, "update result %d", (int)info.result);
    for (int i = 0; i < n; i++) in[i] = float(i % 7);
    CHECK(cudaGraphLaunch(e, s));
    CHECK(cudaStreamSynchronize(s));
    for (int i = 0; i < n; i++) {
        float want = (float(i % 7) * -1.0f + 0.5f) * 4.0f;
        EXPECT(out[i] == want, "whole update: out[%d] = %g, want %g", i, out[i], want);
    }
    // one node fewer: another topology, refused, the instantiated graph unchanged
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    CHECK(cudaMemcpyAsync(d, in, n * sizeof(float), cudaMemcpyHostToDevice, s));
    affine<<<n / 256, 256, 0, s>>>(d, 0.0f, 0.0f, n);
    CHECK(cudaMemcpyAsync(out, d, n * sizeof(float), cudaMemcpyDeviceToHost, s));
    cudaGraph_t g4;
    CHECK(cudaStreamEndCapture(s, &g4));
    err = cudaGraphExecUpdate(e, g4, &info);
    EXPECT(err == cudaErrorGraphExecUpdateFailure && info.result == cudaGraphExecUpdateErrorTopologyChanged,
           "update to another topology: %s, result %d", cudaGetErrorName(err), (int)info.result);
    cudaGetLastError();
    CHECK(cudaGraphLaunch(e, s));
    CHECK(cudaStreamSynchronize(s));
    EXPECT(out[5] == (5.0f * -1.0f + 0.5f) * 4.0f, "after a refused update: out[5] = %g", out[5]);
    CHECK(cudaGraphDestroy(g3)); CHECK(cudaGraphDestroy(g4));

    // -- waiting on a capturing stream is refused and ends the capture
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    affine<<<n / 256, 256, 0, s>>>(d, 1.0f, 1.0f, n);
    err = cudaStreamSynchronize(s);
    EXPECT(err == cudaErrorStreamCaptureUnsupported, "sync during capture: %s", cudaGetErrorName(err));
    cudaGraph_t bad = nullptr;
    err = cudaStreamEndCapture(s, &bad);
    EXPECT(err == cudaErrorStreamCaptureInvalidated && bad == nullptr, "end of an invalidated capture: %s",
           cudaGetErrorName(err));
    cudaGetLastError();                    // the refused calls' errors, seen

    CHECK(cudaGraphExecDestroy(e)); CHECK(cudaGraphExecDestroy(e2));
    CHECK(cudaGraphDestroy(g)); CHECK(cudaGraphDestroy(g2));
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFree(d));
    std::printf("OK graph_capture\n");
    return 0;
}
