// The single registration table of the ai.adq ops and the library's two exported symbols:
// RegisterCustomOps (called by onnxruntime's register_custom_ops_library) and AdqOpNames.
#include <memory>
#include <mutex>
#include <string>

#include "common.h"

#define ADQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace adq {
namespace {

// Every op of the domain, once. Keep in sync with runtime/schema.py (a test checks it).
using OpFactory = const OrtCustomOp* (*)();
constexpr OpFactory kOps[] = {
    ThresholdQuantOp,
    LutDequantOp,
    LutConvOp,
    LutConvQuantOp,
    ConvPoolQuantOp,
    LutConvPoolQuantOp,
    LutGemmOp,
};

std::mutex g_mu;
// Domains handed to sessions must outlive them: keep every one for the process lifetime.
std::vector<std::unique_ptr<Ort::CustomOpDomain>>& Domains() {
  static auto* domains = new std::vector<std::unique_ptr<Ort::CustomOpDomain>>();
  return *domains;
}

}  // namespace
}  // namespace adq

ADQ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                     const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // API version 1 always exists and has CreateStatus.
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "ai.adq: this onnxruntime does not serve the C API version the library was built for");
  }
  Ort::InitApi(api);
  return adq::Guard("RegisterCustomOps", [&] {
    std::lock_guard<std::mutex> lock(adq::g_mu);
    auto domain = std::make_unique<Ort::CustomOpDomain>(adq::kDomain);
    for (adq::OpFactory op : adq::kOps) domain->Add(op());
    Ort::UnownedSessionOptions(options).Add(*domain);
    adq::Domains().push_back(std::move(domain));
  });
}

// Comma-separated names of the registered ops, in table order.
ADQ_EXPORT const char* AdqOpNames() {
  static const std::string names = [] {
    std::string s;
    for (adq::OpFactory op : adq::kOps) {
      const OrtCustomOp* o = op();
      if (!s.empty()) s += ',';
      s += o->GetName(o);
    }
    return s;
  }();
  return names.c_str();
}

// The op domain and its version, for checks from Python.
ADQ_EXPORT const char* AdqDomain() { return adq::kDomain; }
ADQ_EXPORT int AdqDomainVersion() { return adq::kDomainVersion; }
