// cblas_sgemm through oneDNN's matmul primitive, for MLX's CPU matmuls (mlx_clip/onednn_blas.py builds and loads it).
//
// Why: MLX calls plain cblas_sgemm. At the pair's 50-row image-tower products MKL runs 90-140 GFLOP/s on this
// project's AVX-512 VM, oneDNN's brgemm matmul 150-190 (benchmarks/perf-notes.md, session 17). Loaded with RTLD_GLOBAL
// ahead of MKL, this cblas_sgemm wins MLX's symbol lookup; every other BLAS call still goes to MKL, and so does any
// sgemm this file does not take (column-major, alpha != 1, beta other than 0 or 1, or a primitive oneDNN refuses).
//
// oneDNN's headers are not in its pip wheel (onednn-cpu-gomp), so the few C API pieces used are declared here; their
// values are the ones oneDNN 3.x documents (dnnl_types.h, dnnl_common_types.h).

#define _GNU_SOURCE
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef struct dnnl_post_ops* dnnl_post_ops_t;
typedef int64_t dnnl_dims_t[12];
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

enum { dnnl_success = 0, dnnl_cpu = 1, dnnl_f32 = 3, dnnl_data_type_undef = 0, dnnl_stream_in_order = 1 };
enum { dnnl_scratchpad_mode_user = 1, dnnl_query_exec_arg_md = 255 };
enum { ARG_SRC = 1, ARG_DST = 17, ARG_WEIGHTS = 33, ARG_SCRATCHPAD = 80 };

int dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
int dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
int dnnl_stream_wait(dnnl_stream_t);
int dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims, int data_type,
                                         const dnnl_dims_t strides);
int dnnl_memory_desc_clone(dnnl_memory_desc_t*, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
int dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t, void* handle);
int dnnl_memory_destroy(dnnl_memory_t);
int dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
int dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
int dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
int dnnl_primitive_attr_set_post_ops(dnnl_primitive_attr_t, dnnl_post_ops_t);
int dnnl_post_ops_create(dnnl_post_ops_t*);
int dnnl_post_ops_destroy(dnnl_post_ops_t);
int dnnl_post_ops_append_sum(dnnl_post_ops_t, float scale, int32_t zero_point, int data_type);
int dnnl_matmul_primitive_desc_create(dnnl_primitive_desc_t*, dnnl_engine_t, const_dnnl_memory_desc_t src,
                                      const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias,
                                      const_dnnl_memory_desc_t dst, dnnl_primitive_attr_t);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(dnnl_primitive_desc_t, int what, int index);
int dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
int dnnl_primitive_create(dnnl_primitive_t*, dnnl_primitive_desc_t);
int dnnl_primitive_execute(dnnl_primitive_t, dnnl_stream_t, int nargs, const dnnl_exec_arg_t* args);

enum { RowMajor = 101, NoTrans = 111 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                         int);

static sgemm_fn fallback;               // MKL's cblas_sgemm
static int (*fallback_threads)(void);   // MKL_Get_Max_Threads: the project sets MKL's count (cpu_streams.py)
static dnnl_engine_t engine;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static long long taken, passed_on;      // calls run by oneDNN / handed to MKL (read by the tests)
static double min_mnk;                  // smaller products (M*N*K) go to MKL: see mlxclip_onednn_init

// One primitive per shape, layout, accumulation and thread count, made once (creating one costs ~10-100 us).
enum { KEY = 10, SLOTS = 8192 };
typedef struct {
  int64_t key[KEY];
  int used;
  dnnl_primitive_t prim;  // NULL when oneDNN refused the shape: MKL takes it
  dnnl_memory_desc_t a, b, c, scratch;
} entry;
static entry table[SLOTS];

// Called once from Python after loading, before MLX is imported: `mkl_path` is the library every other call goes to;
// products with M*N*K below `smallest` go there too (onednn_blas.MIN_MNK says why).
int mlxclip_onednn_init(const char* mkl_path, double smallest) {
  min_mnk = smallest;
  void* mkl = dlopen(mkl_path, RTLD_NOW | RTLD_GLOBAL);
  if (!mkl) return 1;
  fallback = (sgemm_fn)dlsym(mkl, "cblas_sgemm");
  fallback_threads = (int (*)(void))dlsym(mkl, "MKL_Get_Max_Threads");
  if (!fallback) return 2;
  return dnnl_engine_create(&engine, dnnl_cpu, 0) == dnnl_success ? 0 : 3;
}

long long mlxclip_onednn_taken(void) { return taken; }
long long mlxclip_onednn_passed_on(void) { return passed_on; }

static dnnl_memory_desc_t matrix(int64_t rows, int64_t cols, int transposed, int64_t ld) {
  dnnl_memory_desc_t d = NULL;
  dnnl_dims_t dims = {rows, cols};
  dnnl_dims_t strides = {transposed ? 1 : ld, transposed ? ld : 1};
  dnnl_memory_desc_create_with_strides(&d, 2, dims, dnnl_f32, strides);
  return d;
}

static void build(entry* e) {
  const int64_t* k = e->key;  // ldc, M, N, K, lda, ldb, transA, transB, accumulate, threads
  e->a = matrix(k[1], k[3], k[6] != NoTrans, k[4]);
  e->b = matrix(k[3], k[2], k[7] != NoTrans, k[5]);
  e->c = matrix(k[1], k[2], 0, k[0]);
  dnnl_primitive_attr_t attr;
  dnnl_primitive_attr_create(&attr);
  // Our own scratchpad per call: oneDNN's shared one is not safe for MLX's two CPU streams calling at once
  dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
  if (k[8]) {  // beta 1: C += A B (MLX's addmm)
    dnnl_post_ops_t ops;
    dnnl_post_ops_create(&ops);
    dnnl_post_ops_append_sum(ops, 1.0f, 0, dnnl_data_type_undef);
    dnnl_primitive_attr_set_post_ops(attr, ops);
    dnnl_post_ops_destroy(ops);
  }
  dnnl_primitive_desc_t pd;
  if (dnnl_matmul_primitive_desc_create(&pd, engine, e->a, e->b, NULL, e->c, attr) == dnnl_success) {
    dnnl_memory_desc_clone(&e->scratch, dnnl_primitive_desc_query_md(pd, dnnl_query_exec_arg_md, ARG_SCRATCHPAD));
    if (dnnl_primitive_create(&e->prim, pd) != dnnl_success) e->prim = NULL;
    dnnl_primitive_desc_destroy(pd);
  }
  dnnl_primitive_attr_destroy(attr);
}

static entry* lookup(const int64_t* key) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the key
  for (int i = 0; i < KEY; ++i) h = (h ^ (uint64_t)key[i]) * 1099511628211ull;
  entry* found = NULL;
  pthread_mutex_lock(&lock);
  for (int probe = 0; probe < SLOTS && !found; ++probe) {
    entry* e = &table[(h + probe) % SLOTS];
    if (!e->used) {
      memcpy(e->key, key, sizeof(e->key));
      e->used = 1;
      build(e);
      found = e;
    } else if (!memcmp(e->key, key, sizeof(e->key))) {
      found = e;
    }
  }
  pthread_mutex_unlock(&lock);
  return found && found->prim ? found : NULL;  // a full table or a refused shape: MKL
}

// 0 when nothing was started (MKL then takes the call); a failure once C may be written cannot be handed on
static int run(const entry* e, const float* A, const float* B, float* C) {
  static __thread dnnl_stream_t stream;
  static __thread void* scratch;
  static __thread size_t scratch_size;
  if (!stream && dnnl_stream_create(&stream, engine, dnnl_stream_in_order) != dnnl_success) return 0;
  const size_t need = dnnl_memory_desc_get_size(e->scratch);
  if (need > scratch_size) {
    free(scratch);
    scratch = aligned_alloc(64, (need + 63) / 64 * 64);
    scratch_size = scratch ? need : 0;
    if (!scratch) return 0;
  }
  dnnl_memory_t a, b, c, s;
  dnnl_memory_create(&a, e->a, engine, (void*)A);
  dnnl_memory_create(&b, e->b, engine, (void*)B);
  dnnl_memory_create(&c, e->c, engine, C);
  dnnl_memory_create(&s, e->scratch, engine, scratch);
  const dnnl_exec_arg_t args[4] = {{ARG_SRC, a}, {ARG_WEIGHTS, b}, {ARG_DST, c}, {ARG_SCRATCHPAD, s}};
  if (dnnl_primitive_execute(e->prim, stream, 4, args) != dnnl_success || dnnl_stream_wait(stream) != dnnl_success) {
    fprintf(stderr, "mlx_clip: oneDNN's matmul failed after it began writing its output (M=%lld N=%lld K=%lld)\n",
            (long long)e->key[1], (long long)e->key[2], (long long)e->key[3]);
    abort();
  }
  dnnl_memory_destroy(a);
  dnnl_memory_destroy(b);
  dnnl_memory_destroy(c);
  dnnl_memory_destroy(s);
  return 1;
}

void cblas_sgemm(int layout, int ta, int tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  const int ours = layout == RowMajor && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && M > 0 && N > 0 && K > 0;
  if (engine && ours && (double)M * N * K >= min_mnk) {
    // MKL's thread count for this call (1 per GEMM in batch-parallel mode, where two streams call at once)
    const int threads = fallback_threads ? fallback_threads() : 0;
    const int64_t key[KEY] = {ldc, M, N, K, lda, ldb, ta, tb, beta == 1.0f, threads};
    // Before the lookup: a primitive splits its work for the thread count it is made with
    if (threads > 0) omp_set_num_threads(threads);
    const entry* e = lookup(key);
    if (e) {
      if (run(e, A, B, C)) {
        __atomic_add_fetch(&taken, 1, __ATOMIC_RELAXED);
        return;
      }
    }
  }
  __atomic_add_fetch(&passed_on, 1, __ATOMIC_RELAXED);
  if (!fallback) fallback = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");  // init failed: the next library's
  fallback(layout, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
