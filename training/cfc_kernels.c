/* The per-step loops of a CfC sequence in FastCfC's common layout, forward and backward.
 *
 * Layout (see training/fast_cfc.py, _FusedSequence): one backbone Linear whose tanh-like
 * activation is evaluated as a sigmoid (its affine parts are folded into the weights), heads
 * [2 ff1, 2 ff2, gate] in one matrix, no elapsed times, no mixed memory; mode "default"
 * (h = lerp(tanh ff1, tanh ff2, gate)) or "no_gate" (h = tanh ff1 + gate tanh ff2).
 *
 * Why C: per step the work is two small matrix products and a few elementwise passes over
 * 64 x 384 values. From Python every one of those operations costs several microseconds of
 * interpreter and dispatcher overhead, as much as its arithmetic; here the elementwise passes
 * are fused into one pass each and the matrix products go straight to the BLAS that torch
 * itself calls (its sgemm_/dgemm_, passed in as a function pointer, so this library links
 * against nothing and uses torch's thread settings).
 *
 * Compiled twice by training/cfc_kernels.py: for float, and with -DCFC_DOUBLE for double.
 * All arrays are contiguous, row-major, time-major: (T, B, width). Matrix products are
 * written for column-major BLAS: a row-major (r x c) array is a column-major (c x r) one.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef CFC_DOUBLE
#define REAL double
#else
#define REAL float
#endif

typedef void (*gemm_fn)(const char *transa, const char *transb, const int *m, const int *n,
                        const int *k, const REAL *alpha, const REAL *a, const int *lda,
                        const REAL *b, const int *ldb, const REAL *beta, REAL *c,
                        const int *ldc);

/* exp for float in a form the compiler vectorises (libm's expf is a call per element):
 * Cephes' range reduction and polynomial, about 1 ulp on [-87, 88]. Inputs are clamped to
 * that range, so sigmoid saturates at ~1e-38 instead of 0 (invisible at float precision). */
static inline float exp_f(float x) {
    x = x < 88.3762626647949f ? x : 88.3762626647949f;
    x = x > -87.3365447504f ? x : -87.3365447504f;
    float fx = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)fx + 127) << 23};
    return y * scale.f;
}

#ifdef CFC_DOUBLE
static inline REAL sigmoid(REAL x) { return 1.0 / (1.0 + exp(-x)); }
#else
static inline REAL sigmoid(REAL x) { return 1.0f / (1.0f + exp_f(-x)); }
#endif

/* Forward. pre (T,B,Z): the input part of the backbone Linear for all steps, bias included;
 * h0 (B,N); h_weight (Z,N): its recurrent part; head_w (3N,Z), head_b (3N).
 * Writes acts (T,B,Z): backbone outputs (sigmoids); probs (T,B,3N): sigmoids of the heads;
 * hs (T,B,N): hidden states. */
void cfc_forward(int T, int B, int Z, int N, int lerp, const REAL *pre, const REAL *h0,
                 const REAL *h_weight, const REAL *head_w, const REAL *head_b, REAL *acts,
                 REAL *probs, REAL *hs, gemm_fn gemm) {
    const REAL one = 1, zero = 0;
    const int M = 3 * N;
    for (int t = 0; t < T; t++) {
        const REAL *h = t ? hs + (size_t)(t - 1) * B * N : h0;
        const REAL *pre_t = pre + (size_t)t * B * Z;
        REAL *a = acts + (size_t)t * B * Z;
        REAL *p = probs + (size_t)t * B * M;
        REAL *h_out = hs + (size_t)t * B * N;
        /* a = h @ h_weight^T */
        gemm("T", "N", &Z, &B, &N, &one, h_weight, &N, h, &N, &zero, a, &Z);
        for (size_t i = 0; i < (size_t)B * Z; i++)
            a[i] = sigmoid(a[i] + pre_t[i]);
        /* p = a @ head_w^T */
        gemm("T", "N", &M, &B, &Z, &one, head_w, &Z, a, &Z, &zero, p, &M);
        for (int b = 0; b < B; b++) {
            REAL *row = p + (size_t)b * M;
            for (int j = 0; j < M; j++)
                row[j] = sigmoid(row[j] + head_b[j]);
            const REAL *p1 = row, *p2 = row + N, *g = row + 2 * N;
            REAL *ho = h_out + (size_t)b * N;
            if (lerp) /* lerp(2 p1 - 1, 2 p2 - 1, g) */
                for (int j = 0; j < N; j++)
                    ho[j] = 2 * (p1[j] + g[j] * (p2[j] - p1[j])) - 1;
            else /* (2 p1 - 1) + g (2 p2 - 1) */
                for (int j = 0; j < N; j++)
                    ho[j] = (2 * p1[j] - 1) + g[j] * (2 * p2[j] - 1);
        }
    }
}

/* The gradients of one row's head pre-activations, [d ff1, d ff2, d gate], from the
 * gradient of its new state (d_out from outside the recurrence + d_rec through it). */
static void head_grads(int N, int lerp, const REAL *restrict p1, const REAL *restrict p2,
                       const REAL *restrict g, const REAL *restrict d_out,
                       const REAL *restrict d_rec, REAL *restrict q) {
    REAL *restrict q1 = q, *restrict q2 = q + N, *restrict qg = q + 2 * N;
    if (lerp) /* h = 2 (p1 + g (p2 - p1)) - 1 */
        for (int j = 0; j < N; j++) {
            REAL d = 2 * (d_out[j] + d_rec[j]);
            q1[j] = d * (1 - g[j]) * p1[j] * (1 - p1[j]);
            q2[j] = d * g[j] * p2[j] * (1 - p2[j]);
            qg[j] = d * (p2[j] - p1[j]) * g[j] * (1 - g[j]);
        }
    else /* h = (2 p1 - 1) + g (2 p2 - 1) */
        for (int j = 0; j < N; j++) {
            REAL d = d_out[j] + d_rec[j];
            q1[j] = 2 * d * p1[j] * (1 - p1[j]);
            q2[j] = 2 * d * g[j] * p2[j] * (1 - p2[j]);
            qg[j] = d * (2 * p2[j] - 1) * g[j] * (1 - g[j]);
        }
}

/* Backward through time. d_hs (T,B,N): loss gradient with respect to the hidden states from
 * outside the recurrence; acts, probs: saved by cfc_forward. Writes d_heads (T,B,3N) and
 * d_pre (T,B,Z), the gradients of the head and backbone pre-activations (the caller turns
 * them into weight gradients with a few large matrix products), and dh (B,N): the gradient
 * with respect to h0. da (B,Z) is scratch. */
void cfc_backward(int T, int B, int Z, int N, int lerp, const REAL *d_hs, const REAL *acts,
                  const REAL *probs, const REAL *h_weight, const REAL *head_w, REAL *d_heads,
                  REAL *d_pre, REAL *dh, REAL *da, gemm_fn gemm) {
    const REAL one = 1, zero = 0;
    const int M = 3 * N;
    memset(dh, 0, sizeof(REAL) * (size_t)B * N);
    for (int t = T - 1; t >= 0; t--) {
        const REAL *a = acts + (size_t)t * B * Z;
        REAL *dp = d_pre + (size_t)t * B * Z;
        REAL *dq = d_heads + (size_t)t * B * M;
        for (int b = 0; b < B; b++) {
            const REAL *row = probs + ((size_t)t * B + b) * M;
            head_grads(N, lerp, row, row + N, row + 2 * N, d_hs + ((size_t)t * B + b) * N,
                       dh + (size_t)b * N, dq + (size_t)b * M);
        }
        /* da = d_heads_t @ head_w */
        gemm("N", "N", &Z, &B, &M, &one, head_w, &Z, dq, &M, &zero, da, &Z);
        for (size_t i = 0; i < (size_t)B * Z; i++)
            dp[i] = da[i] * a[i] * (1 - a[i]);
        /* dh = d_pre_t @ h_weight: the gradient reaching the previous step's state */
        gemm("N", "N", &N, &B, &Z, &one, h_weight, &N, dp, &Z, &zero, dh, &N);
    }
}
