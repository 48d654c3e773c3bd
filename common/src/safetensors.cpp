// The safetensors reader and writer (see safetensors.h for the format and what is checked).
#include "unshackle/common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

[[noreturn]] void bad(const std::string& label, const std::string& what) {
  fail(ErrorKind::kInvalidArgument, fmt::format("{}: {}", label, what));
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->label_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  UNS_CHECK_KIND(kIo, fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(ErrorKind::kIo, fmt::format("{}: not a regular file", path));
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    UNS_CHECK_KIND(kIo, mapping != MAP_FAILED, "{}: mmap failed: {}", path, std::strerror(errno));
    file->mapping_ = mapping;
    file->mapping_bytes_ = size;
  } else {
    ::close(fd);
  }
  file->parse_header({static_cast<const uint8_t*>(file->mapping_), size});
  return file;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::parse(std::span<const uint8_t> bytes, std::string label) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->label_ = std::move(label);
  file->owned_.assign(bytes.begin(), bytes.end());
  file->parse_header({file->owned_.data(), file->owned_.size()});
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
}

void SafetensorsFile::parse_header(std::span<const uint8_t> file) {
  if (file.size() < 8) bad(label_, fmt::format("file is {} bytes, shorter than the 8-byte header length", file.size()));
  const uint64_t header_bytes = read_u64_le(file.data());
  if (header_bytes > kMaxHeaderBytes)
    bad(label_, fmt::format("header length {} exceeds the limit of {} bytes", header_bytes, kMaxHeaderBytes));
  if (header_bytes > file.size() - 8)
    bad(label_, fmt::format("header length {} runs past the end of the {}-byte file", header_bytes, file.size()));
  const auto* header_begin = reinterpret_cast<const char*>(file.data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_bytes);
  } catch (const nlohmann::json::exception& e) {
    bad(label_, fmt::format("header is not valid JSON: {}", e.what()));
  }
  if (!header.is_object()) bad(label_, "header is not a JSON object");
  data_ = file.data() + 8 + header_bytes;
  const size_t data_bytes = file.size() - 8 - static_cast<size_t>(header_bytes);

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) bad(label_, "__metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) bad(label_, fmt::format("__metadata__ '{}' is not a string", key));
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = fmt::format("tensor '{}'", name);
    if (!entry.is_object()) bad(label_, where + " is not an object");
    if (!entry.contains("dtype") || !entry["dtype"].is_string()) bad(label_, where + ": missing dtype");
    if (!entry.contains("shape") || !entry["shape"].is_array()) bad(label_, where + ": missing shape");
    if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2)
      bad(label_, where + ": data_offsets must be [begin, end]");
    TensorInfo info;
    info.name = name;
    try {
      info.dtype = dtype_from_name(entry["dtype"].get<std::string>());
    } catch (const Error& e) {
      bad(label_, fmt::format("{}: {}", where, e.what()));
    }
    uint64_t elements = 1;
    for (const auto& dim : entry["shape"]) {
      if (!dim.is_number_integer() || dim.get<int64_t>() < 0) bad(label_, where + ": shape entries must be integers >= 0");
      info.shape.push_back(dim.get<int64_t>());
      const auto d = static_cast<uint64_t>(info.shape.back());
      if (d != 0 && elements > (uint64_t{1} << 62) / d) bad(label_, where + ": shape too large");
      elements *= d;
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      bad(label_, where + ": data_offsets must be non-negative integers");
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end) bad(label_, fmt::format("{}: data_offsets [{}, {}] begin after end", where, begin, end));
    if (end > data_bytes)
      bad(label_, fmt::format("{}: data_offsets [{}, {}] beyond the {}-byte data section", where, begin, end, data_bytes));
    const uint64_t needed = elements * dtype_size(info.dtype);
    if (end - begin != needed)
      bad(label_, fmt::format("{}: data_offsets [{}, {}] span {} bytes but shape x {} needs {}", where, begin, end,
                              end - begin, dtype_name(info.dtype), needed));
    info.offset = static_cast<size_t>(begin);
    info.bytes = static_cast<size_t>(needed);
    tensors_.push_back(std::move(info));
  }
  // No two tensors may share bytes.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& prev = *by_offset[i - 1];
    if (by_offset[i]->offset < prev.offset + prev.bytes && by_offset[i]->bytes > 0 && prev.bytes > 0)
      bad(label_, fmt::format("tensors '{}' and '{}' overlap", prev.name, by_offset[i]->name));
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) fail(ErrorKind::kNotFound, fmt::format("{}: no tensor '{}'", label_, name));
  return tensors_[it->second];
}

std::span<const uint8_t> SafetensorsFile::data(const std::string& name) const {
  const TensorInfo& t = info(name);
  return {data_ + t.offset, t.bytes};
}

std::vector<float> SafetensorsFile::to_f32(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::vector<float> out(static_cast<size_t>(t.numel()));
  try {
    convert_to_f32(t.dtype, data_ + t.offset, out.data(), out.size());
  } catch (const Error&) {
    bad(label_, fmt::format("tensor '{}': dtype {} is not a float type", name, dtype_name(t.dtype)));
  }
  return out;
}

std::vector<int64_t> SafetensorsFile::to_i64(const std::string& name) const {
  const TensorInfo& t = info(name);
  std::vector<int64_t> out(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kI64) {
    if (t.bytes) std::memcpy(out.data(), data_ + t.offset, t.bytes);
  } else if (t.dtype == DType::kI32) {
    for (size_t i = 0; i < out.size(); ++i) {
      int32_t v;
      std::memcpy(&v, data_ + t.offset + 4 * i, 4);
      out[i] = v;
    }
  } else {
    bad(label_, fmt::format("tensor '{}': dtype {} is not I64 or I32", name, dtype_name(t.dtype)));
  }
  return out;
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  UNS_CHECK(static_cast<size_t>(n) * dtype_size(dtype) == bytes.size(), "tensor '{}': {} bytes for {} elements of {}",
            name, bytes.size(), n, dtype_name(dtype));
  UNS_CHECK(std::none_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; }),
            "tensor '{}' added twice", name);
  entries_.push_back({name, dtype, std::move(shape), {bytes.begin(), bytes.end()}});
}

void SafetensorsWriter::add_f32(const std::string& name, std::vector<int64_t> shape, std::span<const float> values) {
  add(name, DType::kF32, std::move(shape), {reinterpret_cast<const uint8_t*>(values.data()), values.size() * 4});
}

void SafetensorsWriter::add_i64(const std::string& name, std::vector<int64_t> shape, std::span<const int64_t> values) {
  add(name, DType::kI64, std::move(shape), {reinterpret_cast<const uint8_t*>(values.data()), values.size() * 8});
}

std::vector<uint8_t> SafetensorsWriter::serialize() const {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  size_t offset = 0;
  for (const Entry& e : entries_) {
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))}, {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data section is 8-byte aligned
  std::vector<uint8_t> out(8 + text.size() + offset);
  const uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<uint8_t>(length >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  uint8_t* data = out.data() + 8 + text.size();
  for (const Entry& e : entries_) {
    if (!e.bytes.empty()) std::memcpy(data, e.bytes.data(), e.bytes.size());
    data += e.bytes.size();
  }
  return out;
}

void SafetensorsWriter::write(const std::string& path) const {
  const std::vector<uint8_t> bytes = serialize();
  const std::string temporary = path + ".tmp";
  FILE* f = std::fopen(temporary.c_str(), "wb");
  UNS_CHECK_KIND(kIo, f != nullptr, "{}: cannot write: {}", temporary, std::strerror(errno));
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!ok || !closed || std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    fail(ErrorKind::kIo, fmt::format("{}: write failed: {}", path, std::strerror(errno)));
  }
}

}  // namespace unshackle
