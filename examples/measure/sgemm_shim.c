/* Route MLX's cblas_sgemm to the OpenBLAS that numpy bundles, for measuring on Linux CPUs.

   The mlx[cpu] wheel links the reference (netlib) BLAS, whose sgemm runs 1-3 GFLOP/s where OpenBLAS runs
   ~70 on one core of the same CPU (docs/FORGE.md, "Why training is slow on this CPU"). Preloading this shim
   makes forge's training steps several times faster there; results are the same up to float rounding.
   Not part of mlx_spec, and not needed on a Mac (Metal) or with another BLAS.

   NP=$(python -c "import numpy, pathlib; print(pathlib.Path(numpy.__file__).parent.parent / 'numpy.libs')")
   gcc -O2 -shared -fPIC examples/measure/sgemm_shim.c -o /tmp/libsgemm_shim.so -L$NP \
       -l:$(basename $(ls $NP/libscipy_openblas64_*.so)) -Wl,-rpath,$NP
   OPENBLAS_NUM_THREADS=1 LD_PRELOAD=/tmp/libsgemm_shim.so mlx_spec.forge ...

   numpy's OpenBLAS is the 64-bit-integer build with prefixed symbols (scipy_cblas_sgemm64_): the CBLAS
   enums pass through, the int sizes widen. */
#include <stdint.h>

extern void scipy_cblas_sgemm64_(int layout, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha,
                                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                                 float *c, int64_t ldc);

void cblas_sgemm(int layout, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    scipy_cblas_sgemm64_(layout, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
