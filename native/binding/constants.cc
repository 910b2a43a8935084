// The kernel's constants, exported so TypeScript never hard-codes a value the build headers
// (or uapi.h's guards) define.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "binding/args.h"
#include "binding/uffd.h"
#include "kernel/uapi.h"

#define SET_U64(obj, name, value) obj.Set(name, U64(env, static_cast<uint64_t>(value)))
#define SET_NUM(obj, name, value) obj.Set(name, Napi::Number::New(env, static_cast<double>(value)))

void InitConstants(Napi::Env env, Napi::Object exports) {
  Napi::Object c = Napi::Object::New(env);

  Napi::Object feature = Napi::Object::New(env);
  SET_U64(feature, "PAGEFAULT_FLAG_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP);
  SET_U64(feature, "EVENT_FORK", UFFD_FEATURE_EVENT_FORK);
  SET_U64(feature, "EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP);
  SET_U64(feature, "EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE);
  SET_U64(feature, "MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS);
  SET_U64(feature, "MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM);
  SET_U64(feature, "EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP);
  SET_U64(feature, "SIGBUS", UFFD_FEATURE_SIGBUS);
  SET_U64(feature, "THREAD_ID", UFFD_FEATURE_THREAD_ID);
  SET_U64(feature, "MINOR_HUGETLBFS", UFFD_FEATURE_MINOR_HUGETLBFS);
  SET_U64(feature, "MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM);
  SET_U64(feature, "EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS);
  SET_U64(feature, "WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
  SET_U64(feature, "WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED);
  SET_U64(feature, "POISON", UFFD_FEATURE_POISON);
  SET_U64(feature, "WP_ASYNC", UFFD_FEATURE_WP_ASYNC);
  SET_U64(feature, "MOVE", UFFD_FEATURE_MOVE);
  c.Set("Feature", feature);

  Napi::Object ioctlBit = Napi::Object::New(env);
  SET_U64(ioctlBit, "REGISTER", 1ULL << _UFFDIO_REGISTER);
  SET_U64(ioctlBit, "UNREGISTER", 1ULL << _UFFDIO_UNREGISTER);
  SET_U64(ioctlBit, "WAKE", 1ULL << _UFFDIO_WAKE);
  SET_U64(ioctlBit, "COPY", 1ULL << _UFFDIO_COPY);
  SET_U64(ioctlBit, "ZEROPAGE", 1ULL << _UFFDIO_ZEROPAGE);
  SET_U64(ioctlBit, "MOVE", 1ULL << _UFFDIO_MOVE);
  SET_U64(ioctlBit, "WRITEPROTECT", 1ULL << _UFFDIO_WRITEPROTECT);
  SET_U64(ioctlBit, "CONTINUE", 1ULL << _UFFDIO_CONTINUE);
  SET_U64(ioctlBit, "POISON", 1ULL << _UFFDIO_POISON);
  SET_U64(ioctlBit, "API", 1ULL << _UFFDIO_API);
  c.Set("IoctlBit", ioctlBit);

  Napi::Object request = Napi::Object::New(env);
  SET_NUM(request, "UFFDIO_API", UFFDIO_API);
  SET_NUM(request, "UFFDIO_REGISTER", UFFDIO_REGISTER);
  SET_NUM(request, "UFFDIO_UNREGISTER", UFFDIO_UNREGISTER);
  SET_NUM(request, "UFFDIO_WAKE", UFFDIO_WAKE);
  SET_NUM(request, "UFFDIO_COPY", UFFDIO_COPY);
  SET_NUM(request, "UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE);
  SET_NUM(request, "UFFDIO_MOVE", UFFDIO_MOVE_ABI);
  SET_NUM(request, "UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT);
  SET_NUM(request, "UFFDIO_CONTINUE", UFFDIO_CONTINUE_ABI);
  SET_NUM(request, "UFFDIO_POISON", UFFDIO_POISON_ABI);
  SET_NUM(request, "USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW);
  c.Set("Ioctl", request);

  Napi::Object mode = Napi::Object::New(env);
  SET_U64(mode, "REGISTER_MODE_MISSING", UFFDIO_REGISTER_MODE_MISSING);
  SET_U64(mode, "REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP);
  SET_U64(mode, "REGISTER_MODE_MINOR", UFFDIO_REGISTER_MODE_MINOR);
  SET_U64(mode, "COPY_MODE_DONTWAKE", UFFDIO_COPY_MODE_DONTWAKE);
  SET_U64(mode, "COPY_MODE_WP", UFFDIO_COPY_MODE_WP);
  SET_U64(mode, "ZEROPAGE_MODE_DONTWAKE", UFFDIO_ZEROPAGE_MODE_DONTWAKE);
  SET_U64(mode, "WRITEPROTECT_MODE_WP", UFFDIO_WRITEPROTECT_MODE_WP);
  SET_U64(mode, "WRITEPROTECT_MODE_DONTWAKE", UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
  SET_U64(mode, "CONTINUE_MODE_DONTWAKE", UFFDIO_CONTINUE_MODE_DONTWAKE_ABI);
  SET_U64(mode, "CONTINUE_MODE_WP", UFFDIO_CONTINUE_MODE_WP_ABI);
  SET_U64(mode, "POISON_MODE_DONTWAKE", UFFDIO_POISON_MODE_DONTWAKE_ABI);
  SET_U64(mode, "MOVE_MODE_DONTWAKE", UFFDIO_MOVE_MODE_DONTWAKE_ABI);
  SET_U64(mode, "MOVE_MODE_ALLOW_SRC_HOLES", UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES_ABI);
  c.Set("Mode", mode);

  Napi::Object fault = Napi::Object::New(env);
  SET_U64(fault, "WRITE", UFFD_PAGEFAULT_FLAG_WRITE);
  SET_U64(fault, "WP", UFFD_PAGEFAULT_FLAG_WP);
  SET_U64(fault, "MINOR", UFFD_PAGEFAULT_FLAG_MINOR);
  c.Set("PagefaultFlag", fault);

  Napi::Object event = Napi::Object::New(env);
  SET_NUM(event, "PAGEFAULT", UFFD_EVENT_PAGEFAULT);
  SET_NUM(event, "FORK", UFFD_EVENT_FORK);
  SET_NUM(event, "REMAP", UFFD_EVENT_REMAP);
  SET_NUM(event, "REMOVE", UFFD_EVENT_REMOVE);
  SET_NUM(event, "UNMAP", UFFD_EVENT_UNMAP);
  c.Set("Event", event);

  Napi::Object open = Napi::Object::New(env);
  SET_NUM(open, "O_CLOEXEC", O_CLOEXEC);
  SET_NUM(open, "O_NONBLOCK", O_NONBLOCK);
  SET_NUM(open, "UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY);
  c.Set("OpenFlag", open);

  Napi::Object prot = Napi::Object::New(env);
  SET_NUM(prot, "PROT_NONE", PROT_NONE);
  SET_NUM(prot, "PROT_READ", PROT_READ);
  SET_NUM(prot, "PROT_WRITE", PROT_WRITE);
  SET_NUM(prot, "PROT_EXEC", PROT_EXEC);
  c.Set("Prot", prot);

  Napi::Object advice = Napi::Object::New(env);
  SET_NUM(advice, "normal", MADV_NORMAL);
  SET_NUM(advice, "random", MADV_RANDOM);
  SET_NUM(advice, "sequential", MADV_SEQUENTIAL);
  SET_NUM(advice, "willneed", MADV_WILLNEED);
  SET_NUM(advice, "dontneed", MADV_DONTNEED);
  SET_NUM(advice, "remove", MADV_REMOVE);
  SET_NUM(advice, "dontfork", MADV_DONTFORK);
  SET_NUM(advice, "dofork", MADV_DOFORK);
  SET_NUM(advice, "hugepage", MADV_HUGEPAGE);
  SET_NUM(advice, "nohugepage", MADV_NOHUGEPAGE);
  SET_NUM(advice, "free", 8);             // MADV_FREE (4.5)
  SET_NUM(advice, "cold", 20);            // MADV_COLD (5.4)
  SET_NUM(advice, "pageout", 21);         // MADV_PAGEOUT (5.4)
  SET_NUM(advice, "populate_read", 22);   // MADV_POPULATE_READ (5.14)
  SET_NUM(advice, "populate_write", 23);  // MADV_POPULATE_WRITE (5.14)
  SET_NUM(advice, "collapse", 25);        // MADV_COLLAPSE (6.1)
  c.Set("Advice", advice);

  SET_NUM(c, "UFFD_API", UFFD_API);
  SET_NUM(c, "MSG_SIZE", sizeof(struct uffd_msg));
  SET_NUM(c, "PAGE_SIZE", sysconf(_SC_PAGESIZE));
  exports.Set("constants", c);
}
