// examples/tenant_worker.py as an nvcc-built CUDA program (bench/fairness.py --native): the
// same kernel, modes and output, through the CUDA runtime on KubeCASH's libcuda.so.1.
//
//   tenant_worker --seconds S --mode saturate|sporadic|duty --iters N --blocks B --depth D
//                 --gap-ms G --period-ms P --memory BYTES [--device cpu0] [--wait]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_)); std::exit(1); } } while (0)

// Each thread iterates a damped recurrence: compute-bound, with a result the host can check.
__global__ void burn(float* out, int iters) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float x = out[i];
    for (int k = 0; k < iters; k++) x = x * 0.5f + 1.0f;
    out[i] = x;
}

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
    double seconds = 5, gap_ms = 20, period_ms = 10;
    std::string mode = "saturate";
    int iters = 2000, blocks = 16, depth = 8;
    size_t memory = 1 << 20;
    bool wait = false;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : "";
        if (a == "--wait") { wait = true; continue; }
        if (a == "--seconds") seconds = std::atof(v);
        else if (a == "--mode") mode = v;
        else if (a == "--iters") iters = std::atoi(v);
        else if (a == "--blocks") blocks = std::atoi(v);
        else if (a == "--depth") depth = std::atoi(v);
        else if (a == "--gap-ms") gap_ms = std::atof(v);
        else if (a == "--period-ms") period_ms = std::atof(v);
        else if (a == "--memory") memory = std::strtoull(v, nullptr, 10);
        else if (a != "--device") { std::fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
        i++;                              // --device: the tenant's first device is the one
    }
    int n = blocks * 128;
    float* out;
    void* hold = nullptr;
    CHECK(cudaMalloc(&out, n * sizeof(float)));
    CHECK(cudaMemset(out, 0, n * sizeof(float)));
    if (memory) CHECK(cudaMalloc(&hold, memory));
    burn<<<1, 1>>>(out, 0);              // loads the module before "ready", as the Python worker does
    CHECK(cudaDeviceSynchronize());
    std::printf("{\"ready\": true}\n");
    std::fflush(stdout);
    if (wait) { char line[64]; if (!std::fgets(line, sizeof line, stdin)) return 1; }
    long launched = 0;
    std::vector<double> latencies;
    cudaEvent_t marks[2];
    CHECK(cudaEventCreate(&marks[0]));
    CHECK(cudaEventCreate(&marks[1]));
    std::mt19937 rng(std::random_device{}());
    std::exponential_distribution<double> gap(1000.0 / gap_ms);
    double end = now() + seconds, next_at = now();
    for (long batch = 0; now() < end;) {
        if (mode == "saturate") {              // two batches in flight: the queue never runs dry
            for (int k = 0; k < depth; k++) burn<<<blocks, 128>>>(out, iters);
            launched += depth;
            CHECK(cudaEventRecord(marks[batch % 2]));
            if (batch) CHECK(cudaEventSynchronize(marks[(batch - 1) % 2]));
            batch++;
        } else {
            if (mode == "duty") {
                next_at = std::max(next_at + period_ms / 1000, now());
                std::this_thread::sleep_for(std::chrono::duration<double>(std::max(0.0, next_at - now())));
            } else {
                std::this_thread::sleep_for(std::chrono::duration<double>(gap(rng)));
            }
            double t0 = now();
            burn<<<blocks, 128>>>(out, iters);
            CHECK(cudaDeviceSynchronize());
            latencies.push_back((now() - t0) * 1000);
            launched++;
        }
    }
    CHECK(cudaDeviceSynchronize());
    std::vector<float> got(n);
    CHECK(cudaMemcpy(got.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost));
    bool ok = true;                           // x -> x/2 + 1 from 0 is 2.0f after >= 30 steps
    if (iters >= 30)
        for (float g : got) ok = ok && g == 2.0f;
    if (hold) CHECK(cudaFree(hold));
    std::printf("{\"kernels\": %ld, \"ok\": %s, \"latencies_ms\": [", launched, ok ? "true" : "false");
    for (size_t i = 0; i < latencies.size(); i++) std::printf("%s%.3f", i ? ", " : "", latencies[i]);
    std::printf("]}\n");
    return 0;
}
