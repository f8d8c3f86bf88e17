// CPU kernels of the sparse training step (saescope/train/fast_path.py; loaded by sparse_kernels.py).
//
// Plain C++ with a C interface (no torch headers: it compiles in about a second and is called through
// ctypes on the tensors' memory). Each kernel is the fused form of a few torch ops of the sparse step, with
// the same math; see fast_path.py for the equations (JumpReLU paper eqs. 11-12, recipe §1):
//
//   scan_candidates  the (token, latent) pairs with xw_bi > lower_i in one block of columns of the product,
//                    row-major (a compare + nonzero), with the values there
//   merge_blocks     the blocks' pairs into one row-major list
//   forward          z, the active / window flags, L0 per token, and the residual x̂ − t of each token
//                    (a bag-sum of active decoder rows onto b_dec (+ x W_skip) − t)
//   latent_order     the pairs grouped by latent, tokens ascending (a counting sort)
//   backward         per latent, in one pass over its pairs: g_f = g_x̂ · W_dec[i] (the sampled product),
//                    ∂L/∂W_dec[i], ∂L/∂W_enc[:, i], ∂L/∂b_enc_i, ∂L/∂θ_i and whether it fired
//
// Work is split over threads by tokens (scan, forward) or by latents (backward), so every output element is
// written by one thread in a fixed order: results do not depend on the thread count's timing, and are the
// same run to run. Every function works for float (dtype 0) and double (dtype 1).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <class F>
void run_parallel(int nthreads, int64_t n, F body) {
  // body(thread, begin, end) over [0, n) split in nthreads contiguous parts
  if (nthreads <= 1 || n < 2) {
    body(0, 0, n);
    return;
  }
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, n));
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) {
    pool.emplace_back([=] { body(t, n * t / nthreads, n * (t + 1) / nthreads); });
  }
  body(0, 0, n / nthreads);
  for (auto& th : pool) th.join();
}

// ---------------------------------------------------------------- scan
template <class T>
int64_t scan_rows(const T* xw, const T* lower, int64_t d, int64_t col_offset, int64_t b0, int64_t b1, int32_t* out,
                  T* vals, int64_t capacity, int64_t* row_counts) {
  int64_t n = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const T* row = xw + b * d;
    int64_t start = n;
    int64_t i = 0;
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) {
      for (; i + 16 <= d; i += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + i), _mm512_loadu_ps(lower + i), _CMP_GT_OQ);
        if (m) {
          if (n + 16 > capacity) return -1;
          while (m) {
            int j = __builtin_ctz(m);
            vals[n] = row[i + j];
            out[n++] = static_cast<int32_t>(col_offset + i + j);
            m &= m - 1;
          }
        }
      }
    } else {
      for (; i + 8 <= d; i += 8) {
        __mmask8 m = _mm512_cmp_pd_mask(_mm512_loadu_pd(row + i), _mm512_loadu_pd(lower + i), _CMP_GT_OQ);
        if (m) {
          if (n + 8 > capacity) return -1;
          unsigned mm = m;
          while (mm) {
            int j = __builtin_ctz(mm);
            vals[n] = row[i + j];
            out[n++] = static_cast<int32_t>(col_offset + i + j);
            mm &= mm - 1;
          }
        }
      }
    }
#endif
    for (; i < d; ++i) {
      if (row[i] > lower[i]) {
        if (n >= capacity) return -1;
        vals[n] = row[i];
        out[n++] = static_cast<int32_t>(col_offset + i);
      }
    }
    row_counts[b] = n - start;
  }
  return n;
}

template <class T>
int64_t scan_candidates(const T* xw, const T* lower, int64_t B, int64_t d, int64_t col_offset, int32_t* cols,
                        T* vals, int64_t capacity, int64_t* row_counts, int nthreads) {
  // xw [B, d]: one block of columns of the product, the latents col_offset … col_offset + d − 1.
  // Writes the pairs row-major (latent indices + col_offset, and the values) and each row's count.
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, B)));
  std::vector<int64_t> found(nthreads, 0);
  int64_t slice = capacity / nthreads;
  run_parallel(nthreads, B, [&](int t, int64_t b0, int64_t b1) {
    found[t] = scan_rows(xw, lower, d, col_offset, b0, b1, cols + slice * t, vals + slice * t, slice, row_counts);
  });
  int64_t total = 0;
  for (int t = 0; t < nthreads; ++t) {
    if (found[t] < 0) return -1;  // more candidates than the buffer holds: the caller takes another path
    if (t > 0 && found[t] > 0) {
      std::memmove(cols + total, cols + slice * t, found[t] * sizeof(int32_t));
      std::memmove(vals + total, vals + slice * t, found[t] * sizeof(T));
    }
    total += found[t];
  }
  return total;
}

template <class T>
void merge_blocks(int64_t n_blocks, int64_t B, const int64_t* counts, const int64_t* block_start,
                  const int32_t* cols_in, const T* vals_in, int32_t* cols, T* vals, int64_t* row_offsets) {
  // the pairs of n_blocks column blocks (block k's rows at block_start[k], counts[k * B + b] per row) into one
  // row-major list: token by token, blocks in order (so latents ascending within a token)
  std::vector<int64_t> src(block_start, block_start + n_blocks);
  int64_t dst = 0;
  row_offsets[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < n_blocks; ++k) {
      int64_t n = counts[k * B + b];
      if (n) {
        std::memcpy(cols + dst, cols_in + src[k], n * sizeof(int32_t));
        std::memcpy(vals + dst, vals_in + src[k], n * sizeof(T));
        src[k] += n;
        dst += n;
      }
    }
    row_offsets[b + 1] = dst;
  }
}

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  // 16 independent partial sums (vectorised without reassociating a single sum)
  constexpr int L = 16;
  T acc[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L) {
    for (int j = 0; j < L; ++j) acc[j] += a[k + j] * b[k + j];
  }
  T s = 0;
  for (; k < n; ++k) s += a[k] * b[k];
  for (int j = 0; j < L; ++j) s += acc[j];
  return s;
}

// ---------------------------------------------------------------- forward
// The backward gathers rows of 640 numbers at random: prefetching the start of the row two pairs ahead saves
// ~15% there (benchmarks/train_step_speed.py); in the forward it costs time, so the forward does not.
constexpr int PREFETCH_AHEAD = 2;
constexpr int PREFETCH_LINES = 8;

template <class T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  // the first PREFETCH_LINES cache lines (the hardware streams the rest; more hurt, measured)
  int64_t bytes = std::min<int64_t>(n * static_cast<int64_t>(sizeof(T)), 64 * PREFETCH_LINES);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(p + k);
}

template <class T>
void forward(int64_t B, int64_t d_out, const int64_t* row_offsets, const int32_t* cols, const T* b_enc,
             const T* theta, T eps, const T* W_dec, const T* b_dec, const T* target, const T* skip, int64_t K,
             const int32_t* block_of, const T* weights, T grad_scale, T* zv, uint8_t* flags, int64_t* l0,
             T* squared_error, T* full_error, T* grad_bags, int nthreads) {
  // zv holds (x − b_dec)W_enc at each pair on entry (from the scan), z = that + b_enc on exit.
  // K Matryoshka prefixes (K = 1: the plain SAE; block_of[i] = the block of latent i, weights[k] = w_k; both
  // null for K = 1): x̂_k − t = Σ_{active i in blocks ≤ k} z W_dec[i] + b_dec (+ skip, nullable) − t.
  // Per token: squared_error = Σ_k w_k ‖x̂_k − t‖² (‖x̂ − t‖² for K = 1), full_error = ‖x̂_{K−1} − t‖² (nullable),
  // grad_bags[b, j] = grad_scale · Σ_{k ≥ j} w_k (x̂_k − t): what a latent of block j sees (grad_scale 2/B).
  // The pairs of a token come latent-ascending, so its blocks come in order.
  run_parallel(nthreads, B, [&](int, int64_t b0, int64_t b1) {
    std::vector<T> running(d_out);
    for (int64_t b = b0; b < b1; ++b) {
      T* bags = grad_bags + b * K * d_out;  // holds x̂_k − t until the last loop below
      const T* t = target + b * d_out;
      T* r = K == 1 ? bags : running.data();
      for (int64_t k = 0; k < d_out; ++k) r[k] = b_dec[k] - t[k];
      if (skip) {
        const T* sk = skip + b * d_out;
        for (int64_t k = 0; k < d_out; ++k) r[k] += sk[k];
      }
      int64_t count = 0, block = 0;
      for (int64_t p = row_offsets[b]; p < row_offsets[b + 1]; ++p) {
        int64_t i = cols[p];
        T z = zv[p] + b_enc[i];
        T u = z - theta[i];
        bool active = u > T(0);
        bool window = std::abs(u / eps) < T(0.5);
        zv[p] = z;
        flags[p] = static_cast<uint8_t>(active) | static_cast<uint8_t>(window << 1);
        if (active) {
          ++count;
          if (K > 1) {
            for (; block < block_of[i]; ++block) std::copy(r, r + d_out, bags + block * d_out);   // prefix done
          }
          const T* w = W_dec + i * d_out;
          for (int64_t k = 0; k < d_out; ++k) r[k] += z * w[k];
        }
      }
      l0[b] = count;
      if (K == 1) {
        squared_error[b] = dot(r, r, d_out);
        if (full_error) full_error[b] = squared_error[b];
        for (int64_t k = 0; k < d_out; ++k) r[k] *= grad_scale;
        continue;
      }
      for (; block < K; ++block) std::copy(r, r + d_out, bags + block * d_out);
      T total = 0;
      for (int64_t k = 0; k < K; ++k) {
        T sq = dot(bags + k * d_out, bags + k * d_out, d_out);
        total += weights[k] * sq;
        if (k == K - 1 && full_error) full_error[b] = sq;
      }
      squared_error[b] = total;
      std::fill(running.begin(), running.end(), T(0));  // Σ_{k ≥ j} grad_scale w_k (x̂_k − t), j descending
      for (int64_t k = K - 1; k >= 0; --k) {
        T c = grad_scale * weights[k];
        T* bag = bags + k * d_out;
        for (int64_t q = 0; q < d_out; ++q) {
          running[q] += c * bag[q];
          bag[q] = running[q];
        }
      }
    }
  });
}

// ---------------------------------------------------------------- latent-major order
void latent_order(int64_t B, int64_t d_sae, const int64_t* row_offsets, const int32_t* cols,
                  int64_t* latent_offsets, int32_t* pair_of, int32_t* token_of) {
  std::fill(latent_offsets, latent_offsets + d_sae + 1, 0);
  int64_t P = row_offsets[B];
  for (int64_t p = 0; p < P; ++p) latent_offsets[cols[p] + 1]++;
  for (int64_t i = 0; i < d_sae; ++i) latent_offsets[i + 1] += latent_offsets[i];
  std::vector<int64_t> cursor(latent_offsets, latent_offsets + d_sae);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t p = row_offsets[b]; p < row_offsets[b + 1]; ++p) {
      int64_t q = cursor[cols[p]]++;
      pair_of[q] = static_cast<int32_t>(p);
      token_of[q] = static_cast<int32_t>(b);
    }
  }
}

// ---------------------------------------------------------------- backward
template <class T>
void backward(int64_t d_sae, int64_t d_in, int64_t d_out, const int64_t* latent_offsets, const int32_t* pair_of,
              const int32_t* token_of, const T* zv, const uint8_t* flags, const T* theta, T eps, T sparsity,
              const T* token_scale, const T* latent_scale, const T* W_dec, int64_t K, const int32_t* block_of,
              const T* g_xhat, const T* xc, T* grad_W_dec,
              T* grad_W_enc_t, T* grad_b_enc, T* grad_theta, uint8_t* fired, bool project, int nthreads) {
  // g_xhat [B, K, d_out]: the forward's grad_bags (∂L/∂x̂ for K = 1; block_of null then); xc [B, d_in] the
  // encoder input; grad_W_enc_t [d_sae, d_in] (W_enc transposed)
  // sparsity = (λ/B)/ε; token_scale (nullable) multiplies it per token (the target-L0 penalty);
  // latent_scale (nullable) adds its latent's factor to that (the frequency penalty: μψ'(p_i))
  // project: remove from ∂L/∂W_dec[i] its component along W_dec[i] (decoder_norm.project_out_parallel_gradient)
  // Split the latents so each thread gets about the same number of pairs.
  int64_t P = latent_offsets[d_sae];
  std::vector<int64_t> bounds(nthreads + 1, d_sae);
  bounds[0] = 0;
  for (int t = 1; t < nthreads; ++t) {
    bounds[t] = std::upper_bound(latent_offsets, latent_offsets + d_sae + 1, P * t / nthreads) - latent_offsets - 1;
    bounds[t] = std::max(bounds[t], bounds[t - 1]);
  }
  run_parallel(nthreads, nthreads, [&](int, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i) {
        const T* w = W_dec + i * d_out;
        T* gd = grad_W_dec + i * d_out;
        T* ge = grad_W_enc_t + i * d_in;
        std::fill(gd, gd + d_out, T(0));
        std::fill(ge, ge + d_in, T(0));
        T gb = 0, gt = 0;
        bool any = false;
        const T th = theta[i];
        const T extra = latent_scale ? sparsity * latent_scale[i] : T(0);
        const int64_t bag = K > 1 ? block_of[i] : 0;
        for (int64_t q = latent_offsets[i]; q < latent_offsets[i + 1]; ++q) {
          if (q + PREFETCH_AHEAD < P) {
            int64_t ahead = token_of[q + PREFETCH_AHEAD];
            prefetch_row(g_xhat + (ahead * K + bag) * d_out, d_out);
            prefetch_row(xc + ahead * d_in, d_in);
          }
          int64_t p = pair_of[q], b = token_of[q];
          const T* g = g_xhat + (b * K + bag) * d_out;
          T gf = dot(w, g, d_out);
          uint8_t fl = flags[p];
          if (fl & 1) {
            T z = zv[p];
            for (int64_t k = 0; k < d_out; ++k) gd[k] += z * g[k];
            const T* xb = xc + b * d_in;
            for (int64_t k = 0; k < d_in; ++k) ge[k] += gf * xb[k];
            gb += gf;
            any = true;
          }
          if (fl & 2) {
            T s = token_scale ? sparsity * token_scale[b] : sparsity;
            if (latent_scale) s += extra;
            gt += gf * (-th / eps) - s;
          }
        }
        if (project && any) {
          T ww = dot(w, w, d_out);
          if (ww > T(0)) {
            T c = dot(gd, w, d_out) / ww;
            for (int64_t k = 0; k < d_out; ++k) gd[k] -= c * w[k];
          }
        }
        grad_b_enc[i] = gb;
        grad_theta[i] = gt;
        fired[i] = any;
      }
    }
  });
}

}  // namespace

extern "C" {

int64_t saescope_scan_candidates(int dtype, const void* xw, const void* lower, int64_t B, int64_t d,
                                 int64_t col_offset, int32_t* cols, void* vals, int64_t capacity, int64_t* row_counts,
                                 int nthreads) {
  if (dtype == 0)
    return scan_candidates(static_cast<const float*>(xw), static_cast<const float*>(lower), B, d, col_offset, cols,
                           static_cast<float*>(vals), capacity, row_counts, nthreads);
  return scan_candidates(static_cast<const double*>(xw), static_cast<const double*>(lower), B, d, col_offset, cols,
                         static_cast<double*>(vals), capacity, row_counts, nthreads);
}

void saescope_merge_blocks(int dtype, int64_t n_blocks, int64_t B, const int64_t* counts, const int64_t* block_start,
                           const int32_t* cols_in, const void* vals_in, int32_t* cols, void* vals,
                           int64_t* row_offsets) {
  if (dtype == 0)
    merge_blocks(n_blocks, B, counts, block_start, cols_in, static_cast<const float*>(vals_in), cols,
                 static_cast<float*>(vals), row_offsets);
  else
    merge_blocks(n_blocks, B, counts, block_start, cols_in, static_cast<const double*>(vals_in), cols,
                 static_cast<double*>(vals), row_offsets);
}

void saescope_forward(int dtype, int64_t B, int64_t d_out, const int64_t* row_offsets, const int32_t* cols,
                      const void* b_enc, const void* theta, double eps, const void* W_dec, const void* b_dec,
                      const void* target, const void* skip, int64_t K, const int32_t* block_of, const void* weights,
                      double grad_scale, void* zv, uint8_t* flags, int64_t* l0, void* squared_error, void* full_error,
                      void* grad_bags, int nthreads) {
  if (dtype == 0)
    forward(B, d_out, row_offsets, cols, static_cast<const float*>(b_enc), static_cast<const float*>(theta),
            static_cast<float>(eps), static_cast<const float*>(W_dec), static_cast<const float*>(b_dec),
            static_cast<const float*>(target), static_cast<const float*>(skip), K, block_of,
            static_cast<const float*>(weights), static_cast<float>(grad_scale), static_cast<float*>(zv), flags, l0,
            static_cast<float*>(squared_error), static_cast<float*>(full_error), static_cast<float*>(grad_bags),
            nthreads);
  else
    forward(B, d_out, row_offsets, cols, static_cast<const double*>(b_enc), static_cast<const double*>(theta), eps,
            static_cast<const double*>(W_dec), static_cast<const double*>(b_dec), static_cast<const double*>(target),
            static_cast<const double*>(skip), K, block_of, static_cast<const double*>(weights), grad_scale,
            static_cast<double*>(zv), flags, l0, static_cast<double*>(squared_error),
            static_cast<double*>(full_error), static_cast<double*>(grad_bags), nthreads);
}

void saescope_latent_order(int64_t B, int64_t d_sae, const int64_t* row_offsets, const int32_t* cols,
                           int64_t* latent_offsets, int32_t* pair_of, int32_t* token_of) {
  latent_order(B, d_sae, row_offsets, cols, latent_offsets, pair_of, token_of);
}

void saescope_backward(int dtype, int64_t d_sae, int64_t d_in, int64_t d_out, const int64_t* latent_offsets,
                       const int32_t* pair_of, const int32_t* token_of, const void* zv, const uint8_t* flags,
                       const void* theta, double eps, double sparsity, const void* token_scale,
                       const void* latent_scale, const void* W_dec,
                       int64_t K, const int32_t* block_of, const void* g_xhat, const void* xc, void* grad_W_dec,
                       void* grad_W_enc_t, void* grad_b_enc, void* grad_theta, uint8_t* fired, int project,
                       int nthreads) {
  if (dtype == 0)
    backward(d_sae, d_in, d_out, latent_offsets, pair_of, token_of, static_cast<const float*>(zv), flags,
             static_cast<const float*>(theta), static_cast<float>(eps), static_cast<float>(sparsity),
             static_cast<const float*>(token_scale), static_cast<const float*>(latent_scale),
             static_cast<const float*>(W_dec), K, block_of,
             static_cast<const float*>(g_xhat), static_cast<const float*>(xc), static_cast<float*>(grad_W_dec),
             static_cast<float*>(grad_W_enc_t), static_cast<float*>(grad_b_enc), static_cast<float*>(grad_theta),
             fired, project != 0, nthreads);
  else
    backward(d_sae, d_in, d_out, latent_offsets, pair_of, token_of, static_cast<const double*>(zv), flags,
             static_cast<const double*>(theta), eps, sparsity, static_cast<const double*>(token_scale),
             static_cast<const double*>(latent_scale), static_cast<const double*>(W_dec), K, block_of, static_cast<const double*>(g_xhat),
             static_cast<const double*>(xc), static_cast<double*>(grad_W_dec), static_cast<double*>(grad_W_enc_t),
             static_cast<double*>(grad_b_enc), static_cast<double*>(grad_theta), fired, project != 0, nthreads);
}

}  // extern "C"
