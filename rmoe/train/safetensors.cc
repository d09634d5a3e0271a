#include "rmoe/train/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include <absl/strings/str_cat.h>
#include <absl/strings/str_join.h>

#include "rmoe/util/files.h"
#include "rmoe/util/json.h"

namespace rmoe {
namespace {

struct DtypeName {
  torch::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {
    {torch::kFloat, "F32"},  {torch::kDouble, "F64"}, {torch::kHalf, "F16"},
    {torch::kBFloat16, "BF16"}, {torch::kLong, "I64"}, {torch::kInt, "I32"},
    {torch::kShort, "I16"},  {torch::kChar, "I8"},    {torch::kByte, "U8"},
    {torch::kBool, "BOOL"},
};

bool TypeOfName(const std::string& name, torch::ScalarType* type) {
  for (const auto& d : kDtypes) {
    if (name == d.name) {
      *type = d.type;
      return true;
    }
  }
  return false;
}

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xFF);
  return bytes;
}

absl::Status Damaged(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat("safetensors file ", path, " is damaged: ", what));
}

// One tensor's entry of a parsed header, checked against the data section's size.
absl::StatusOr<torch::Tensor> ReadEntry(const std::string& path, const std::string& name,
                                        const JsonValue& entry, const char* data,
                                        uint64_t data_size, std::pair<uint64_t, uint64_t>* span) {
  const JsonValue* dtype = entry.Get("dtype");
  const JsonValue* shape = entry.Get("shape");
  const JsonValue* offsets = entry.Get("data_offsets");
  if (entry.type != JsonValue::kObject || !dtype || dtype->type != JsonValue::kString || !shape ||
      shape->type != JsonValue::kArray || !offsets || offsets->type != JsonValue::kArray ||
      offsets->array.size() != 2) {
    return Damaged(path, absl::StrCat("tensor \"", name,
                                      "\" needs \"dtype\", \"shape\" and two \"data_offsets\""));
  }
  torch::ScalarType type;
  if (!TypeOfName(dtype->string, &type)) {
    return Damaged(path, absl::StrCat("tensor \"", name, "\" has dtype \"", dtype->string,
                                      "\", which this reader does not know"));
  }
  std::vector<int64_t> sizes;
  uint64_t elements = 1;
  for (const JsonValue& dim : shape->array) {
    if (dim.type != JsonValue::kNumber || dim.number < 0 || dim.number > 1e15 ||
        dim.number != static_cast<double>(static_cast<int64_t>(dim.number))) {
      return Damaged(path, absl::StrCat("tensor \"", name, "\" has an invalid shape"));
    }
    sizes.push_back(static_cast<int64_t>(dim.number));
    elements *= static_cast<uint64_t>(sizes.back());
  }
  for (const JsonValue& offset : offsets->array) {
    if (offset.type != JsonValue::kNumber || offset.number < 0 ||
        offset.number > static_cast<double>(data_size)) {
      return Damaged(path, absl::StrCat("tensor \"", name, "\" has data_offsets outside the ",
                                        data_size, " bytes of data"));
    }
  }
  span->first = static_cast<uint64_t>(offsets->array[0].number);
  span->second = static_cast<uint64_t>(offsets->array[1].number);
  const uint64_t bytes = elements * c10::elementSize(type);
  if (span->second < span->first || span->second - span->first != bytes) {
    return Damaged(path, absl::StrCat("tensor \"", name, "\" of ", elements, " ", dtype->string,
                                      " elements needs ", bytes, " bytes, its data_offsets span ",
                                      span->second - span->first));
  }
  auto tensor = torch::empty(sizes, torch::TensorOptions().dtype(type));
  if (bytes > 0) std::memcpy(tensor.data_ptr(), data + span->first, bytes);
  return tensor;
}

}  // namespace

std::string SafetensorsDtype(torch::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  return "";
}

absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<size_t> order(tensors.size());
  std::set<std::string> names;
  for (size_t i = 0; i < tensors.size(); ++i) {
    order[i] = i;
    const auto& [name, tensor] = tensors[i];
    if (name.empty() || name == "__metadata__" || !names.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot write ", path, ": tensor name \"", name,
                       "\" is empty, reserved or used twice"));
    }
    if (SafetensorsDtype(tensor.scalar_type()).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write ", path, ": tensor \"", name,
                                                     "\" has dtype ", c10::toString(tensor.scalar_type()),
                                                     ", which safetensors cannot hold"));
    }
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tensors[a].second.element_size() > tensors[b].second.element_size();
  });
  std::vector<std::string> meta_fields;
  for (const auto& [key, value] : metadata) meta_fields.push_back(JsonString(key) + ":" + JsonString(value));
  std::string header = "{\"__metadata__\":{" + absl::StrJoin(meta_fields, ",") + "}";
  uint64_t at = 0;
  for (size_t i : order) {
    const auto& [name, tensor] = tensors[i];
    const uint64_t bytes = static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
    absl::StrAppend(&header, ",", JsonString(name), ":{\"dtype\":\"",
                    SafetensorsDtype(tensor.scalar_type()), "\",\"shape\":[",
                    absl::StrJoin(tensor.sizes(), ","), "],\"data_offsets\":[", at, ",",
                    at + bytes, "]}");
    at += bytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');

  auto file = AtomicFileWriter::Open(path);
  if (!file.ok()) return file.status();
  if (auto s = file->Append(LittleEndian64(header.size())); !s.ok()) return s;
  if (auto s = file->Append(header); !s.ok()) return s;
  for (size_t i : order) {
    const auto host = tensors[i].second.detach().to(torch::kCPU).contiguous();
    const absl::string_view bytes(static_cast<const char*>(host.data_ptr()), host.nbytes());
    if (auto s = file->Append(bytes); !s.ok()) return s;
  }
  return file->Commit();
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  auto bytes = ReadFile(path, "safetensors file");
  if (!bytes.ok()) return bytes.status();
  if (bytes->size() < 8) return Damaged(path, absl::StrCat("it has only ", bytes->size(), " bytes"));
  uint64_t header_size = 0;
  for (int i = 0; i < 8; ++i) {
    header_size |= static_cast<uint64_t>(static_cast<unsigned char>((*bytes)[i])) << (8 * i);
  }
  if (header_size > bytes->size() - 8) {
    return Damaged(path, absl::StrCat("its header announces ", header_size, " bytes; the file has ",
                                      bytes->size() - 8, " after the length"));
  }
  JsonValue header;
  if (!ParseJson(absl::string_view(*bytes).substr(8, header_size), &header) ||
      header.type != JsonValue::kObject) {
    return Damaged(path, "its header is not a JSON object");
  }
  const char* data = bytes->data() + 8 + header_size;
  const uint64_t data_size = bytes->size() - 8 - header_size;
  SafetensorsFile file;
  std::vector<std::pair<std::pair<uint64_t, uint64_t>, size_t>> spans;
  for (const auto& [name, entry] : header.object) {
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.object) {
        if (value.type == JsonValue::kString) file.metadata[key] = value.string;
      }
      continue;
    }
    std::pair<uint64_t, uint64_t> span;
    auto tensor = ReadEntry(path, name, entry, data, data_size, &span);
    if (!tensor.ok()) return tensor.status();
    spans.push_back({span, file.tensors.size()});
    file.tensors.emplace_back(name, *std::move(tensor));
  }
  // The tensors' bytes must tile the data section: no gap, no overlap, nothing after.
  std::sort(spans.begin(), spans.end());
  uint64_t at = 0;
  NamedTensors in_file_order;
  for (const auto& [span, index] : spans) {
    if (span.first != at) {
      return Damaged(path, absl::StrCat("tensor \"", file.tensors[index].first, "\" starts at byte ",
                                        span.first, " of the data, expected ", at));
    }
    at = span.second;
    in_file_order.push_back(std::move(file.tensors[index]));
  }
  if (at != data_size) {
    return Damaged(path, absl::StrCat("its tensors cover ", at, " of its ", data_size,
                                      " bytes of data"));
  }
  file.tensors = std::move(in_file_order);
  return file;
}

}  // namespace rmoe
