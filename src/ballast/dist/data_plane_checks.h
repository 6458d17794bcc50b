#pragma once
// What every DataPlane checks of its arguments, and the messages it fails with, in one place so
// that the implementations fail alike (the conformance suite compares their messages). Internal
// to dist/: the implementations call these, nothing above the interface does.
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ballast/core/tensor.h"
#include "ballast/dist/data_plane.h"

namespace ballast::dist::detail {

// all_to_all_v's arguments on one rank, checked.
struct RowArgs {
  size_t row_bytes = 0;  // bytes of one row (send's and recv's)
  DType dtype = DType::F32;
  int64_t send_rows = 0;                // rows send holds
  int64_t recv_rows = 0;                // rows recv has room for
  std::vector<int64_t> send_counts;     // [G], each >= 0, summing to at most send's rows
  int64_t rows_out = 0;                 // their sum
};

// Checks return the error message instead of throwing, so that implementations can first tell
// the other ranks. `impl` names the implementation in messages ("thread", "MPI", "NCCL"); `where`
// is the memory it moves (host planes: CPU).

// The rank's own mistakes that need no count values: buffers not in the plane's memory, counts not
// I32 [G], send and recv of other row sizes or dtypes, overlap. Fills out's sizes.
std::optional<std::string> check_row_buffers(int rank, int size, const Tensor& send, const Tensor& send_counts,
                                             const Tensor& recv, const Tensor& recv_counts, std::string_view impl,
                                             Device where, RowArgs* out);
// The count values (on the host, as read from send_counts): none negative, no more than send
// holds (out->send_rows, from check_row_buffers). Fills out's counts.
std::optional<std::string> check_send_counts(int rank, std::span<const int32_t> counts, RowArgs* out);
// Both, for host planes (the counts read from send_counts).
std::optional<std::string> check_all_to_all_v(int rank, int size, const Tensor& send, const Tensor& send_counts,
                                              const Tensor& recv, const Tensor& recv_counts,
                                              std::string_view impl, RowArgs* out);

// The error of a rank whose recv is too small for the rows `from` (by source rank) sends it.
std::optional<std::string> check_recv_room(int rank, std::span<const int64_t> from, int64_t recv_rows);

// all_gather's arguments: `all` holds size x mine, same dtype, both in the plane's memory; `mine`
// may be all's own slot (in place) but may not overlap it otherwise.
std::optional<std::string> check_all_gather(int rank, int size, const Tensor& mine, const Tensor& all,
                                            std::string_view impl, Device where = Device::CPU);
// all_reduce_sum's: I32, I64 or F32, in the plane's memory.
std::optional<std::string> check_all_reduce(int rank, const Tensor& data, std::string_view impl,
                                            Device where = Device::CPU);
// send_recv's: peers in [0, size), buffers in the plane's memory.
std::optional<std::string> check_transfers(int rank, int size, std::span<const DataPlane::Transfer> items,
                                           std::string_view impl, Device where = Device::CPU);

// What one rank passes to a collective, to be the same on every rank: the bytes of a row
// (all_to_all_v) or the elements (all_gather, all_reduce_sum), and the dtype.
struct Layout {
  int64_t size = 0;
  DType dtype = DType::F32;
};
// The message naming the first rank whose layout differs from rank 0's, or nullopt. `rows`: the
// sizes are row bytes (all_to_all_v), else element counts.
std::optional<std::string> check_same_layout(std::string_view call, std::span<const Layout> by_rank, bool rows);

// What a rank states of its arguments to a collective, in a fixed layout that processes gather as
// bytes (MPI, NCCL): its verdict on its own arguments and what it passes.
struct Statement {
  int64_t failed = 0;
  int64_t size = 0;  // Layout::size
  int64_t dtype = 0;
  char message[1024] = {};  // the error, cut to fit
  Statement() = default;
  Statement(const std::optional<std::string>& error, Layout mine);
  Layout layout() const { return {size, static_cast<DType>(dtype)}; }
};

// Throws the verdict of a collective whose ranks' errors (by rank; this rank's in full) and
// layouts every rank knows alike: this rank its own error, the others "rank R failed: <R's>" for
// the first rank at fault, all the same message when no rank is at fault but the layouts differ.
// Returns when nothing is wrong.
void throw_verdict(std::string_view call, int rank, std::span<const std::optional<std::string>> errors,
                   std::span<const Layout> layouts, bool rows);
// The same from every rank's Statement (by rank) and this rank's own error in full (a Statement
// carries it cut to its 1023 bytes).
void throw_verdict(std::string_view call, int rank, std::span<const Statement> said,
                   const std::optional<std::string>& mine, bool rows);

// The receiving side of a point-to-point pair whose sizes disagree.
std::string transfer_size_mismatch(int receiver, int64_t expected, int sender, int64_t sent);

// acc[i] += x[i] for n elements of dtype (I32, I64: wrapping; F32: one rounding per add). Sums
// over ranks call it in rank order, starting from a copy of rank 0's data, so every rank and
// every implementation computes the same bits.
void add_into(DType dtype, void* acc, const void* x, size_t n);

}  // namespace ballast::dist::detail
