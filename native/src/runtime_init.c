/* Driver entry points that NVIDIA's runtime (cudart) calls while it initialises, beyond the
 * ones cuda_api.c serves for driver-API programs: answered locally, no message sent. Found
 * by tracing nvcc-built programs (KUBECASH_DEBUG=1, tests/c/runtime_tour.cu). */
#include <stdlib.h>
#include <string.h>

#include "kc.h"

enum { CU_MODULE_EAGER_LOADING = 1, CU_MODULE_LAZY_LOADING = 2 };

/* The driver's answer follows CUDA_MODULE_LOADING as NVIDIA's does (lazy unless EAGER):
 * lazy, cudart loads a fatbin's kernels when first launched, not all at start-up. */
KC_EXPORT CUresult cuModuleGetLoadingMode(int *mode) {
    if (!mode) return CUDA_ERROR_INVALID_VALUE;
    const char *v = getenv("CUDA_MODULE_LOADING");
    *mode = v && !strcmp(v, "EAGER") ? CU_MODULE_EAGER_LOADING : CU_MODULE_LAZY_LOADING;
    return CUDA_SUCCESS;
}
