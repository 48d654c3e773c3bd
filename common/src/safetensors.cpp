// The safetensors reader and writer (see safetensors.h for the format and what is checked).
#include "unshackle/common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <set>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

using Json = nlohmann::json;

[[noreturn]] void bad(const std::string& label, const std::string& what) {
  fail(ErrorKind::kInvalidArgument, fmt::format("{}: {}", label, what));
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ",")); }

// Parses the header, rejecting duplicate keys at any depth: nlohmann would keep the last one
// silently, so two entries named "q" could hide a tensor.
Json parse_json(const std::string& label, const char* begin, const char* end) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  const auto callback = [&](int, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) open_objects.emplace_back();
    if (event == Json::parse_event_t::object_end) open_objects.pop_back();
    if (event == Json::parse_event_t::key && !open_objects.back().insert(parsed.get<std::string>()).second &&
        duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  Json header;
  try {
    header = Json::parse(begin, end, callback);
  } catch (const Json::exception& e) {
    bad(label, fmt::format("header is not valid JSON: {}", e.what()));
  }
  if (!duplicate.empty()) bad(label, fmt::format("header has the key '{}' twice", duplicate));
  return header;
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
  if (fd < 0) {
    // A missing file is the caller's mistake (kNotFound); anything else is the system's.
    const int error = errno;
    fail(error == ENOENT ? ErrorKind::kNotFound : ErrorKind::kIo,
         fmt::format("{}: cannot open: {}", path, std::strerror(error)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(path, "not a regular file");
  }
  const auto size = static_cast<size_t>(st.st_size);
  if (size > 0) {
    void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int error = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (mapping == MAP_FAILED) fail(ErrorKind::kIo, fmt::format("{}: mmap failed: {}", path, std::strerror(error)));
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
  const Json header = parse_json(label_, header_begin, header_begin + header_bytes);
  if (!header.is_object()) bad(label_, "header is not a JSON object");
  data_ = file.data() + 8 + header_bytes;
  const size_t data_bytes = file.size() - 8 - static_cast<size_t>(header_bytes);

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) bad(label_, "__metadata__ is not an object of strings");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          bad(label_, fmt::format("__metadata__ '{}' is not a string (got {})", key, value.dump()));
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = fmt::format("tensor '{}'", name);
    if (!entry.is_object()) bad(label_, where + " is not an object");
    if (!entry.contains("dtype") || !entry["dtype"].is_string()) bad(label_, where + ": missing dtype (a string)");
    if (!entry.contains("shape") || !entry["shape"].is_array()) bad(label_, where + ": missing shape (an array)");
    if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2)
      bad(label_, where + ": missing data_offsets [begin, end]");
    TensorInfo info;
    info.name = name;
    try {
      info.dtype = dtype_from_name(entry["dtype"].get<std::string>());
    } catch (const Error& e) {
      bad(label_, fmt::format("{}: {}", where, e.what()));
    }
    uint64_t elements = 1;
    for (const auto& dim : entry["shape"]) {
      // Non-negative integers parse as unsigned; the bound keeps numel() and the byte count exact.
      if (!dim.is_number_unsigned())
        bad(label_, fmt::format("{}: shape {} must hold integers >= 0", where, entry["shape"].dump()));
      const uint64_t d = dim.get<uint64_t>();
      if (d != 0 && elements > (uint64_t{1} << 52) / d)
        bad(label_, fmt::format("{}: shape {} is too large", where, entry["shape"].dump()));
      info.shape.push_back(static_cast<int64_t>(d));
      elements *= d;
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      bad(label_, fmt::format("{}: data_offsets {} must be integers >= 0", where, offsets.dump()));
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end) bad(label_, fmt::format("{}: data_offsets [{}, {}] begin after end", where, begin, end));
    if (end > data_bytes)
      bad(label_, fmt::format("{}: data_offsets [{}, {}] run beyond the {}-byte data section", where, begin, end,
                              data_bytes));
    const uint64_t needed = elements * dtype_size(info.dtype);
    if (end - begin != needed)
      bad(label_, fmt::format("{}: data_offsets [{}, {}] span {} bytes but shape {} x {} needs {}", where, begin, end,
                              end - begin, shape_text(info.shape), dtype_name(info.dtype), needed));
    info.offset = static_cast<size_t>(begin);
    info.bytes = static_cast<size_t>(needed);
    tensors_.push_back(std::move(info));
  }
  // No two tensors may share bytes. Empty tensors own none; once they are left out, sorted
  // neighbours suffice.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors_)
    if (t.bytes > 0) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& prev = *by_offset[i - 1];
    const TensorInfo& next = *by_offset[i];
    if (next.offset < prev.offset + prev.bytes)
      bad(label_, fmt::format("tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", prev.name, prev.offset,
                              prev.offset + prev.bytes, next.name, next.offset, next.offset + next.bytes));
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
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16 && t.dtype != DType::kF64)
    bad(label_, fmt::format("tensor '{}': dtype {} is not a float type", name, dtype_name(t.dtype)));
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (out.empty()) return out;
  if (reinterpret_cast<uintptr_t>(data_ + t.offset) % dtype_size(t.dtype) == 0) {
    convert_to_f32(t.dtype, data_ + t.offset, out.data(), out.size());
  } else {
    // Offsets need not be aligned in the format; convert from an aligned copy.
    std::vector<uint64_t> aligned((t.bytes + 7) / 8);
    std::memcpy(aligned.data(), data_ + t.offset, t.bytes);
    convert_to_f32(t.dtype, aligned.data(), out.data(), out.size());
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

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::span<const uint8_t> bytes) {
  UNS_CHECK(!name.empty() && name != "__metadata__", "tensor name '{}' is reserved or empty", name);
  UNS_CHECK(std::none_of(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; }),
            "tensor '{}' added twice", name);
  int64_t n = 1;
  for (int64_t d : shape) {
    UNS_CHECK(d >= 0, "tensor '{}': negative dimension in shape {}", name, shape_text(shape));
    n *= d;
  }
  UNS_CHECK(static_cast<size_t>(n) * dtype_size(dtype) == bytes.size(), "tensor '{}': {} bytes for shape {} x {}",
            name, bytes.size(), shape_text(shape), dtype_name(dtype));
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
  UNS_CHECK(text.size() <= SafetensorsFile::kMaxHeaderBytes, "header of {} bytes exceeds the {}-byte limit",
            text.size(), SafetensorsFile::kMaxHeaderBytes);
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
  // A per-process temporary in the same directory, so rename() is atomic and two writers of
  // one path never share it; readers see the old file or the whole new one.
  const std::string temporary = fmt::format("{}.tmp-{}", path, ::getpid());
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(ErrorKind::kIo, fmt::format("{}: cannot write: {}", path, std::strerror(errno)));
  size_t done = 0;
  int error = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = n < 0 ? errno : EIO;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (error == 0 && ::fsync(fd) != 0) error = errno;
  if (::close(fd) != 0 && error == 0) error = errno;
  if (error == 0 && std::rename(temporary.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    ::unlink(temporary.c_str());
    fail(ErrorKind::kIo, fmt::format("{}: write failed: {}", path, std::strerror(error)));
  }
}

}  // namespace unshackle
