#include "engine/fault_sources.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernel/uapi.h"

namespace {
const uint64_t kPage = 4096;

uint64_t RoundUp(uint64_t v) {
  return (v + kPage - 1) & ~(kPage - 1);
}

// The fill ioctls write bytes done (or -errno) into a SIGNED trailing field; partial progress
// is EAGAIN with a positive count, "event pending" is EAGAIN with -EAGAIN.
FillResult Outcome(int rc, int64_t out, uint64_t len, const char* syscall) {
  FillResult r;
  r.syscall = syscall;
  if (rc == 0) {
    r.done = len;
    return r;
  }
  r.err = errno;
  if (out > 0) {
    r.done = static_cast<uint64_t>(out);
    if (r.err == EAGAIN && r.done < len) r.err = EAGAIN;  // partial: the caller continues
  }
  return r;
}
}  // namespace

FillResult CopyPages(int uffd, uint64_t dst, const void* src, uint64_t len) {
  struct uffdio_copy copy = {};
  copy.dst = dst;
  copy.src = reinterpret_cast<uintptr_t>(src);
  copy.len = len;
  int rc = ioctl(uffd, UFFDIO_COPY, &copy);
  return Outcome(rc, copy.copy, len, "ioctl(UFFDIO_COPY)");
}

FillResult ZeroPages(int uffd, uint64_t dst, uint64_t len) {
  struct uffdio_zeropage zp = {};
  zp.range.start = dst;
  zp.range.len = len;
  int rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
  FillResult r = Outcome(rc, zp.zeropage, len, "ioctl(UFFDIO_ZEROPAGE)");
  r.zero = true;
  return r;
}

void WakePages(int uffd, uint64_t start, uint64_t len) {
  struct uffdio_range range = {start, len};
  ioctl(uffd, UFFDIO_WAKE, &range);
}

Source* Source::Buffer(const uint8_t* data, uint64_t length) {
  Source* s = new Source();
  s->kind_ = kBuffer;
  s->data_ = data;
  s->length_ = length;
  return s;
}

Source* Source::File(int fd, uint64_t offset, bool useMmap, int* err, std::string* syscall) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *err = errno;
    *syscall = "fstat";
    return nullptr;
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  Source* s = new Source();
  s->kind_ = kFile;
  s->fileOffset_ = offset;
  s->length_ = size > offset ? size - offset : 0;
  // mmap needs a page-aligned file offset; other offsets are served through pread.
  if (useMmap && s->length_ > 0 && offset % kPage == 0) {
    s->mapLength_ = RoundUp(s->length_);
    void* m = mmap(nullptr, s->mapLength_, PROT_READ, MAP_PRIVATE, fd, static_cast<off_t>(offset));
    if (m == MAP_FAILED) {
      *err = errno;
      *syscall = "mmap";
      delete s;
      return nullptr;
    }
    s->map_ = m;
    s->data_ = static_cast<uint8_t*>(m);
  } else {
    s->fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (s->fd_ < 0) {
      *err = errno;
      *syscall = "fcntl(F_DUPFD_CLOEXEC)";
      delete s;
      return nullptr;
    }
  }
  return s;
}

Source* Source::Zero() {
  return new Source();
}

Source* Source::Handler(uint32_t handlerId) {
  Source* s = new Source();
  s->kind_ = kHandler;
  s->handlerId_ = handlerId;
  return s;
}

Source::~Source() {
  if (map_ != nullptr) munmap(map_, mapLength_);
  if (fd_ >= 0) close(fd_);
}

FillResult Source::Fill(int uffd, uint64_t dst, uint64_t at, uint64_t len,
                        std::vector<uint8_t>* scratch) const {
  // Pages wholly past the content are zero pages; the page holding the end is copied (its
  // tail reads as zeros from both a mapping and a short pread).
  uint64_t contentPages = kind_ == kZero || kind_ == kHandler ? 0 : RoundUp(length_);
  if (at >= contentPages) return ZeroPages(uffd, dst, len);
  uint64_t n = len < contentPages - at ? len : contentPages - at;
  if (data_ != nullptr) {
    if (at + n <= length_) return CopyPages(uffd, dst, data_ + at, n);
    // A buffer's partial last page (only when its length is not page-aligned): bounce it.
    // A file mapping's last page reads as zeros past the end of the file.
    if (map_ == nullptr) {
      if (scratch->size() < n) scratch->resize(n);
      memcpy(scratch->data(), data_ + at, length_ - at);
      memset(scratch->data() + (length_ - at), 0, n - (length_ - at));
      return CopyPages(uffd, dst, scratch->data(), n);
    }
    return CopyPages(uffd, dst, data_ + at, n);
  }
  if (scratch->size() < n) scratch->resize(n);
  uint64_t got = 0;
  while (got < n) {
    ssize_t r = pread(fd_, scratch->data() + got, n - got, static_cast<off_t>(fileOffset_ + at + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      FillResult f;
      f.err = errno;
      f.syscall = "pread";
      return f;
    }
    if (r == 0) break;  // the file shrank: the rest reads as zeros
    got += static_cast<uint64_t>(r);
  }
  if (got < n) memset(scratch->data() + got, 0, n - got);
  return CopyPages(uffd, dst, scratch->data(), n);
}
