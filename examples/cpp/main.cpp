// Runs every problem of an exported apex4gen build through its C API, as an engine would, and checks each
// result against a host reference of the numerics contract (apex4gen/reference.py, README "Numerics").
//
// Per problem (N, K, group, activation bits, dtype): a random weight is quantized on the GPU (apex4gen quantize_act in the S4
// format gives the canonical packed int4 values; the scales are stored in the output dtype) and prepared once
// (prepare_weight: every layout the build's kernels read). Per M in {1, 7, 300}: select_kernel, activations
// quantized in the kernel's format (or passed raw to a kernel that quantizes them itself), run_kernel on a
// stream, then sampled columns compared with the host reference within the contract's tolerance.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include APEX4GEN_BUILD_HEADER

namespace {

const int kMs[] = {1, 7, 300};
constexpr int kSampledColumns = 64;  // the host reference checks these columns of every row (and all for NaN)

struct Failure {
  std::string what;
};

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Failure{std::string(what) + ": " + cudaGetErrorString(err)};
}

void check_status(const apex4gen_api& api, int status, const char* what) {
  if (status != APEX4GEN_OK) throw Failure{std::string(what) + ": " + api.status_string(status)};
}

// Device memory freed on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) check_cuda(cudaMalloc(&ptr, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr(other.ptr) { other.ptr = nullptr; }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

// Random values in [-1, 1) (xorshift: fast enough for weights of a few hundred million values).
struct Random {
  uint64_t state;
  float next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return static_cast<float>(state >> 40) / static_cast<float>(1 << 23) - 1.0f;
  }
};

uint16_t to_bits(float v, apex4gen_dtype dtype) {
  uint16_t bits;
  if (dtype == APEX4GEN_F16) {
    const __half h = __float2half_rn(v);
    std::memcpy(&bits, &h, 2);
  } else {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    std::memcpy(&bits, &b, 2);
  }
  return bits;
}

float from_bits(uint16_t bits, apex4gen_dtype dtype) {
  if (dtype == APEX4GEN_F16) {
    __half h;
    std::memcpy(&h, &bits, 2);
    return __half2float(h);
  }
  __nv_bfloat16 b;
  std::memcpy(&b, &bits, 2);
  return __bfloat162float(b);
}

std::vector<uint16_t> random_matrix(int64_t count, float scale, apex4gen_dtype dtype, Random& rng) {
  std::vector<uint16_t> values(count);
  for (auto& v : values) v = to_bits(rng.next() * scale, dtype);
  return values;
}

DeviceBuffer upload(const void* host, size_t bytes) {
  DeviceBuffer buffer(bytes);
  check_cuda(cudaMemcpy(buffer.ptr, host, bytes, cudaMemcpyHostToDevice), "upload");
  return buffer;
}

template <typename T>
std::vector<T> download(const void* device, size_t count) {
  std::vector<T> host(count);
  check_cuda(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return host;
}

// The contract's activation quantization of one row: qmax = 7 (4-bit) or 127 (8-bit), s = absmax / qmax in fp32,
// q = clamp(rint(x / s), -qmax - 1, qmax).
void quantize_row(const float* x, int k, int group, int act_bits, int8_t* q, float* s) {
  const float qmax = act_bits == 8 ? 127.f : 7.f;
  for (int g = 0; g < k / group; ++g) {
    float absmax = 0.f;
    for (int i = 0; i < group; ++i) absmax = std::max(absmax, std::fabs(x[g * group + i]));
    const float scale = absmax / qmax;
    s[g] = scale;
    for (int i = 0; i < group; ++i) {
      const float r = scale == 0.f ? 0.f : std::nearbyint(x[g * group + i] / scale);
      q[g * group + i] = static_cast<int8_t>(std::min(qmax, std::max(-qmax - 1.f, r)));
    }
  }
}

int weight_value(const std::vector<uint8_t>& packed, int k, int64_t n, int64_t i) {
  const int nibble = (packed[n * (k / 2) + i / 2] >> (4 * (i & 1))) & 0xF;
  return nibble >= 8 ? nibble - 16 : nibble;
}

struct Weight {
  std::vector<uint8_t> values;  // canonical [N, K/2], as quantized on the GPU
  std::vector<uint16_t> scales;  // [N, K/group] in the output dtype
  std::vector<uint16_t> bias;    // [N]
};

struct Problem {
  int n, k, group, act_bits;
  apex4gen_dtype dtype;
};

// Quantizes a random weight on the GPU and prepares it; returns what the host reference needs.
Weight quantize_and_prepare(const apex4gen_api& api, const Problem& p, Random& rng, DeviceBuffer& prepared,
                            cudaStream_t stream) {
  const int groups = p.k / p.group;
  const std::vector<uint16_t> w = random_matrix(int64_t{p.n} * p.k, 0.05f, p.dtype, rng);
  DeviceBuffer w_dev = upload(w.data(), w.size() * 2);
  DeviceBuffer values(size_t{1} * p.n * p.k / 2), scales32(size_t{4} * p.n * groups);
  check_status(api, api.quantize_act(w_dev.ptr, p.k, p.dtype, p.n, p.k, p.group, 4, APEX4GEN_ACT_S4, values.ptr,
                                     static_cast<float*>(scales32.ptr), stream), "quantize the weight");
  check_cuda(cudaStreamSynchronize(stream), "quantize the weight");
  Weight weight;
  weight.values = download<uint8_t>(values.ptr, size_t{1} * p.n * p.k / 2);
  for (float s : download<float>(scales32.ptr, size_t{1} * p.n * groups)) weight.scales.push_back(to_bits(s, p.dtype));
  weight.bias = random_matrix(p.n, 1.0f, p.dtype, rng);
  DeviceBuffer scales = upload(weight.scales.data(), weight.scales.size() * 2);
  check_status(api, api.prepare_weight(values.ptr, scales.ptr, p.n, p.k, p.group, p.dtype, prepared.ptr,
                                       api.prepared_weight_bytes(p.n, p.k, p.group, p.dtype), stream),
               "prepare the weight");
  check_cuda(cudaStreamSynchronize(stream), "prepare the weight");  // the canonical buffers go out of scope
  return weight;
}

size_t activation_bytes(int format, int m, int k) {
  if (format == APEX4GEN_ACT_S4) return size_t{1} * m * k / 2;
  if (format == APEX4GEN_ACT_RAW) return 0;
  return size_t{1} * m * k;
}

// One GEMM through the C API; returns y [M, N] as 16-bit values.
std::vector<uint16_t> run(const apex4gen_api& api, const Problem& p, int m, int kernel, const void* prepared,
                          const DeviceBuffer& x, const DeviceBuffer& bias, cudaStream_t stream) {
  const int format = api.kernel_act_format(kernel);
  DeviceBuffer qx(activation_bytes(format, m, p.k)), sx(size_t{4} * m * (p.k / p.group));
  const void* act = x.ptr;
  const float* act_scales = nullptr;
  if (format != APEX4GEN_ACT_RAW) {
    check_status(api, api.quantize_act(x.ptr, p.k, p.dtype, m, p.k, p.group, api.kernel_act_bits(kernel),
                                       static_cast<apex4gen_act_format>(format), qx.ptr, static_cast<float*>(sx.ptr),
                                       stream), "quantize activations");
    act = qx.ptr;
    act_scales = static_cast<const float*>(sx.ptr);
  }
  apex4gen_gemm_args args{};
  check_status(api, api.prepared_operands(kernel, prepared, p.n, p.k, p.group, p.dtype, &args.qw, &args.sw),
               "prepared operands");
  const size_t workspace_bytes = api.kernel_workspace(kernel, m, p.n, p.k);
  DeviceBuffer workspace(workspace_bytes), y(size_t{2} * m * p.n);
  check_cuda(cudaMemsetAsync(y.ptr, 0xFF, size_t{2} * m * p.n, stream), "poison y");  // NaN where never written
  args.qx = act;
  args.sx = act_scales;
  args.bias = bias.ptr;
  args.y = y.ptr;
  args.m = m;
  args.n = p.n;
  args.k = p.k;
  args.group = p.group;
  args.workspace = workspace.ptr;
  args.workspace_bytes = workspace_bytes;
  check_status(api, api.run_kernel(kernel, &args, stream), "run_kernel");
  check_cuda(cudaStreamSynchronize(stream), "run_kernel");
  return download<uint16_t>(y.ptr, size_t{1} * m * p.n);
}

// Worst |y - reference| / tolerance over sampled columns (<= 1 passes); throws on a non-finite output.
double worst_error_ratio(const Problem& p, int m, const std::vector<uint16_t>& x, const Weight& w,
                         const std::vector<uint16_t>& y) {
  for (uint16_t v : y) {
    if (!std::isfinite(from_bits(v, p.dtype))) throw Failure{"non-finite output (an element never written?)"};
  }
  const int groups = p.k / p.group;
  const double eps = p.dtype == APEX4GEN_F16 ? std::ldexp(1.0, -10) : std::ldexp(1.0, -7);
  const double tiny = p.dtype == APEX4GEN_F16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126);
  std::vector<float> row(p.k), sx(groups);
  std::vector<int8_t> qx(p.k);
  double worst = 0;
  for (int i = 0; i < m; ++i) {
    for (int c = 0; c < p.k; ++c) row[c] = from_bits(x[int64_t{i} * p.k + c], p.dtype);
    quantize_row(row.data(), p.k, p.group, p.act_bits, qx.data(), sx.data());
    for (int s = 0; s < kSampledColumns; ++s) {
      const int64_t n = int64_t{s} * (p.n - 1) / (kSampledColumns - 1);
      double ref = 0, abssum = 0;
      for (int g = 0; g < groups; ++g) {
        int64_t partial = 0;
        for (int c = g * p.group; c < (g + 1) * p.group; ++c) partial += qx[c] * weight_value(w.values, p.k, n, c);
        const double term = double{sx[g]} * from_bits(w.scales[n * groups + g], p.dtype) * static_cast<double>(partial);
        ref += term;
        abssum += std::fabs(term);
      }
      const double bias = from_bits(w.bias[n], p.dtype);
      ref += bias;
      abssum += std::fabs(bias);
      const double tolerance = (groups + 4) * std::ldexp(1.0, -23) * abssum * (1 + eps) + eps * std::fabs(ref) + tiny;
      const double error = std::fabs(from_bits(y[int64_t{i} * p.n + n], p.dtype) - ref);
      worst = std::max(worst, error / tolerance);
    }
  }
  return worst;
}

const char* dtype_name(apex4gen_dtype dtype) { return dtype == APEX4GEN_F16 ? "f16" : "bf16"; }

}  // namespace

int main() {
  const apex4gen_api api = APEX4GEN_BUILD_API();
  if (api.abi_version() != APEX4GEN_ABI_VERSION) {
    std::printf("ABI mismatch: library %d, header %d\n", api.abi_version(), APEX4GEN_ABI_VERSION);
    return 2;
  }
  std::printf("apex4gen %s (ABI %d), sm_%d: %d problems, %d kernels\n", api.version(), api.abi_version(),
              api.build_arch(), api.num_problems(), api.num_kernels());
  cudaStream_t stream;
  if (cudaStreamCreate(&stream) != cudaSuccess) {
    std::printf("no CUDA device: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 2;
  }
  Random rng{0x9E3779B97F4A7C15ull};
  int passed = 0, failed = 0;
  for (int index = 0; index < api.num_problems(); ++index) {
    Problem p{};
    api.problem(index, &p.n, &p.k, &p.group, &p.act_bits, &p.dtype);
    try {
      DeviceBuffer prepared(api.prepared_weight_bytes(p.n, p.k, p.group, p.dtype));
      const Weight weight = quantize_and_prepare(api, p, rng, prepared, stream);
      DeviceBuffer bias = upload(weight.bias.data(), weight.bias.size() * 2);
      for (int m : kMs) {
        const int kernel = api.select_kernel(m, p.n, p.k, p.group, p.act_bits, p.dtype);
        std::printf("N=%d K=%d g=%d a%d %s M=%d ", p.n, p.k, p.group, p.act_bits, dtype_name(p.dtype), m);
        try {
          if (kernel < 0) throw Failure{"no kernel selected"};
          const std::vector<uint16_t> x = random_matrix(int64_t{m} * p.k, 4.0f, p.dtype, rng);
          DeviceBuffer x_dev = upload(x.data(), x.size() * 2);
          const std::vector<uint16_t> y = run(api, p, m, kernel, prepared.ptr, x_dev, bias, stream);
          const double ratio = worst_error_ratio(p, m, x, weight, y);
          const bool ok = ratio <= 1.0;
          std::printf("%s: worst error %.3f of tolerance: %s\n", api.kernel_name(kernel), ratio, ok ? "pass" : "FAIL");
          (ok ? passed : failed) += 1;
        } catch (const Failure& f) {
          std::printf("%s: FAIL (%s)\n", kernel < 0 ? "-" : api.kernel_name(kernel), f.what.c_str());
          failed += 1;
        }
      }
    } catch (const Failure& f) {
      std::printf("N=%d K=%d g=%d %s: FAIL (%s)\n", p.n, p.k, p.group, dtype_name(p.dtype), f.what.c_str());
      failed += static_cast<int>(sizeof(kMs) / sizeof(kMs[0]));
    }
  }
  cudaStreamDestroy(stream);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
