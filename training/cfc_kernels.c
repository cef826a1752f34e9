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

/* exp for double in a vectorisable form, for the same reason: Cephes' range reduction and
 * Pade form, about 1 ulp on [-708, 709]; inputs are clamped to that range. */
static inline double exp_d(double x) {
    x = x < 709.0 ? x : 709.0;
    x = x > -708.0 ? x : -708.0;
    double fx = __builtin_floor(x * 1.4426950408889634073599 + 0.5);
    x = x - fx * 6.93145751953125e-1 - fx * 1.42860682030941723212e-6;
    double xx = x * x;
    double px = x * ((1.26177193074810590878e-4 * xx + 3.02994407707441961300e-2) * xx +
                     9.99999999999999999910e-1);
    double qx = ((3.00198505138664455042e-6 * xx + 2.52448340349684104192e-3) * xx +
                 2.27265548208155028766e-1) * xx + 2.00000000000000000009e0;
    union {
        int64_t i;
        double d;
    } scale = {.i = ((int64_t)fx + 1023) << 52};
    return (1.0 + 2.0 * px / (qx - px)) * scale.d;
}

#ifdef CFC_DOUBLE
static inline REAL sigmoid(REAL x) { return 1.0 / (1.0 + exp_d(-x)); }
#else
static inline REAL sigmoid(REAL x) { return 1.0f / (1.0f + exp_f(-x)); }
#endif

/* The heads' pre-activations p (B,3N) -> their sigmoids (in place) -> the new state (B,N). */
static void heads_to_state(int B, int N, int lerp, REAL *p, const REAL *head_b, REAL *h_out) {
    const int M = 3 * N;
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
        heads_to_state(B, N, lerp, p, head_b, h_out);
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

/* One step of a stack of L layers in this layout plus a linear output head, for inference:
 * rollouts call the model once per 12-hour bin for a few patients, where issuing some twenty
 * small tensor operations per step from Python costs more than their arithmetic.
 * Layer l reads xh = [input_l, h[l]] (B, K_l), K_0 = I + N and K_l = 2N after it:
 *   a = sigmoid(xh @ xh_wt[l] + b0[l])        xh_wt[l] (K_l, Z)
 *   h_new[l] = state from sigmoid(a @ head_wt[l] + head_b[l])   head_wt[l] (Z, 3N)
 * then out = h_new[L-1] @ out_wt + out_b (B, O), out_wt (N, O). All row-major; x (B, I) has
 * row stride ldx (a time slice of a (B, T, I) array). scratch: B (max(I, N) + N + Z + 3N). */
void cfc_stack_step(int B, int L, int I, int Z, int N, int O, int lerp, const REAL *x, int ldx,
                    const REAL *const *h, REAL *const *h_new, const REAL *const *xh_wt,
                    const REAL *const *b0, const REAL *const *head_wt,
                    const REAL *const *head_b, const REAL *out_wt, const REAL *out_b, REAL *out,
                    REAL *scratch, gemm_fn gemm) {
    const REAL one = 1, zero = 0;
    const int M = 3 * N;
    REAL *xh = scratch;
    REAL *a = xh + (size_t)B * ((I > N ? I : N) + N);
    REAL *p = a + (size_t)B * Z;
    for (int l = 0; l < L; l++) {
        const int in = l ? N : I, K = in + N, lds = l ? N : ldx;
        const REAL *src = l ? h_new[l - 1] : x;
        for (int b = 0; b < B; b++) {
            memcpy(xh + (size_t)b * K, src + (size_t)b * lds, sizeof(REAL) * in);
            memcpy(xh + (size_t)b * K + in, h[l] + (size_t)b * N, sizeof(REAL) * N);
        }
        /* row-major (B,K) @ (K,Z) is column-major (Z,K) @ (K,B) */
        gemm("N", "N", &Z, &B, &K, &one, xh_wt[l], &Z, xh, &K, &zero, a, &Z);
        for (int b = 0; b < B; b++) {
            REAL *row = a + (size_t)b * Z;
            for (int j = 0; j < Z; j++)
                row[j] = sigmoid(row[j] + b0[l][j]);
        }
        gemm("N", "N", &M, &B, &Z, &one, head_wt[l], &M, a, &Z, &zero, p, &M);
        heads_to_state(B, N, lerp, p, head_b[l], h_new[l]);
    }
    gemm("N", "N", &O, &B, &N, &one, out_wt, &O, h_new[L - 1], &N, &zero, out, &O);
    for (int b = 0; b < B; b++)
        for (int j = 0; j < O; j++)
            out[(size_t)b * O + j] += out_b[j];
}

/* A whole forecast of B histories in one call: the history bins through the stack, a row
 * keeping its state once its history has ended, then K - 1 steps that feed back the clipped
 * prediction. The arithmetic of training/rollout.py's encode and continue_rollout over
 * cfc_stack_step; a forecast is about a dozen steps, and issuing them one by one from Python
 * cost a fifth of a 16-patient call.
 * x (B, T, I): model inputs [state (O), observed mask (O), interventions (I - 2 O)];
 * lengths (B): real bins per row, 1..T; future (B, K - 1, I - 2 O): the interventions fed with
 * steps 2..K; lo, hi (O): the bounds every prediction is clipped to; residual: the head
 * predicts the change of the state. Writes pred (B, K, O).
 * work: 2 L B N + B (O + I) + the scratch of cfc_stack_step. */
void cfc_stack_forecast(int B, int T, int K, int L, int I, int Z, int N, int O, int lerp,
                        int residual, const REAL *x, const int64_t *lengths, const REAL *future,
                        const REAL *lo, const REAL *hi, const REAL *const *xh_wt,
                        const REAL *const *b0, const REAL *const *head_wt,
                        const REAL *const *head_b, const REAL *out_wt, const REAL *out_b,
                        REAL *pred, REAL *work, gemm_fn gemm) {
    const size_t layer = (size_t)B * N;
    const int V = I - 2 * O;
    REAL *h[L], *h_new[L];
    for (int l = 0; l < L; l++) {
        h[l] = work + (size_t)l * layer;
        h_new[l] = work + (size_t)(L + l) * layer;
    }
    REAL *out = work + 2 * (size_t)L * layer;
    REAL *xin = out + (size_t)B * O;
    REAL *scratch = xin + (size_t)B * I;
    memset(work, 0, sizeof(REAL) * (size_t)L * layer);
    for (int t = 0; t < T; t++) {
        cfc_stack_step(B, L, I, Z, N, O, lerp, x + (size_t)t * I, T * I,
                       (const REAL *const *)h, h_new, xh_wt, b0, head_wt, head_b, out_wt, out_b,
                       out, scratch, gemm);
        for (int b = 0; b < B; b++) {
            if (t >= lengths[b]) /* past this row's history: its state stays */
                continue;
            for (int l = 0; l < L; l++)
                memcpy(h[l] + (size_t)b * N, h_new[l] + (size_t)b * N, sizeof(REAL) * N);
            if (t == lengths[b] - 1) {
                const REAL *state = x + ((size_t)b * T + t) * I;
                REAL *y = pred + (size_t)b * K * O;
                for (int j = 0; j < O; j++) {
                    REAL v = out[(size_t)b * O + j] + (residual ? state[j] : 0);
                    y[j] = v < lo[j] ? lo[j] : (v > hi[j] ? hi[j] : v); /* keeps NaN */
                }
            }
        }
    }
    for (int k = 1; k < K; k++) {
        for (int b = 0; b < B; b++) {
            REAL *row = xin + (size_t)b * I;
            memcpy(row, pred + ((size_t)b * K + k - 1) * O, sizeof(REAL) * O);
            memset(row + O, 0, sizeof(REAL) * O);
            memcpy(row + 2 * O, future + ((size_t)b * (K - 1) + k - 1) * V, sizeof(REAL) * V);
        }
        cfc_stack_step(B, L, I, Z, N, O, lerp, xin, I, (const REAL *const *)h, h_new, xh_wt, b0,
                       head_wt, head_b, out_wt, out_b, out, scratch, gemm);
        for (int l = 0; l < L; l++) {
            REAL *swap = h[l];
            h[l] = h_new[l];
            h_new[l] = swap;
        }
        for (int b = 0; b < B; b++) {
            const REAL *prev = xin + (size_t)b * I;
            REAL *y = pred + ((size_t)b * K + k) * O;
            for (int j = 0; j < O; j++) {
                REAL v = out[(size_t)b * O + j] + (residual ? prev[j] : 0);
                y[j] = v < lo[j] ? lo[j] : (v > hi[j] ? hi[j] : v);
            }
        }
    }
}
