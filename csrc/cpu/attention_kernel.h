// The online-softmax paged-attention driver shared by every ISA (see attention.h). Included by
// one .cpp per ISA after that file's own primitives are defined; everything here has internal
// linkage (anonymous namespace in the includer), and this header includes nothing, so the
// AVX-512 translation unit never instantiates a shared inline function with AVX-512 code.
//
// Requires, in the including scope, a struct Isa with static members:
//   decode(const uint8_t* src, int64_t tok_stride, int64_t n, int64_t D, KvKind, float* dst)
//   qk(const float* q, const float* k, int64_t n, int64_t D, float* s)     s[j] = q . k[j]
//   exp_sub(float* s, int64_t n, float m) -> float    s[j] = exp(s[j] - m), returns the sum
//   pv(float* o, float alpha, const float* p, const float* v, int64_t n, int64_t D)
//                                                      o = alpha * o + sum_j p[j] * v[j]
//   scale(float* o, float a, int64_t D)

template <class Isa>
void attend_impl(const AttnTask& a) {
  const int64_t R = a.R, D = a.D, bs = a.block_size;
  float* kt = a.work;
  float* vt = kt + kKeyTile * D;
  float* S = vt + kKeyTile * D;
  float* m = S + R * kKeyTile;
  float* l = m + R;
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -__builtin_inff();
    l[r] = 0.f;
    for (int64_t d = 0; d < D; ++d) a.out[r * D + d] = 0.f;
  }
  const int64_t hi = a.pos[R - 1] + 1;
  int64_t lo = 0;
  if (a.window > 0 && a.pos[0] - a.window + 1 > 0) lo = a.pos[0] - a.window + 1;
  for (int64_t t0 = lo; t0 < hi;) {
    const int64_t blk = t0 / bs, off = t0 % bs;
    int64_t n = bs - off;
    if (n > kKeyTile) n = kKeyTile;
    if (n > hi - t0) n = hi - t0;
    const int64_t block = a.blocks[blk];
    Isa::decode(a.kc + block * a.k_blk + off * a.k_tok, a.k_tok, n, D, a.kind, kt);
    bool v_ready = false;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t p = a.pos[r];
      int64_t j0 = 0, j1 = p - t0 + 1;  // keys t0 + j with j in [j0, j1)
      if (a.window > 0 && p - a.window + 1 - t0 > 0) j0 = p - a.window + 1 - t0;
      if (j1 > n) j1 = n;
      if (j1 <= j0) continue;
      float* s = S + r * kKeyTile;
      Isa::qk(a.q + r * D, kt + j0 * D, j1 - j0, D, s);
      float mx = m[r];
      for (int64_t j = 0; j < j1 - j0; ++j)
        if (s[j] > mx) mx = s[j];
      if (mx == -__builtin_inff()) mx = 0.f;  // all scores NaN: let the NaN through exp
      const float alpha = __builtin_expf(m[r] - mx);  // 0 on the first tile (m = -inf)
      const float sum = Isa::exp_sub(s, j1 - j0, mx);
      l[r] = l[r] * alpha + sum;
      m[r] = mx;
      if (!v_ready) {
        Isa::decode(a.vc + block * a.v_blk + off * a.v_tok, a.v_tok, n, D, a.kind, vt);
        v_ready = true;
      }
      Isa::pv(a.out + r * D, alpha, s, vt + j0 * D, j1 - j0, D);
    }
    t0 += n;
  }
  for (int64_t r = 0; r < R; ++r) Isa::scale(a.out + r * D, 1.f / l[r], D);
}
