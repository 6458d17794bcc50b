// The data plane of in-process ranks. Collectives meet twice: at the first meeting every rank has
// published its buffers and the last to arrive has checked them all (so that a bad call fails on
// every rank before any row moves); each rank then copies what it receives straight out of the
// senders' buffers, and the second meeting keeps every sender from returning (and reusing its
// buffer) before all have read it. Point-to-point sends wait, unread, in the receiver's mailbox.
// Errors are the MPI data plane's: bad collective arguments fail every rank in the same call and
// the world goes on; a size mismatch fails the receiver once the rest of its call is done.
// On a device the ranks share (on_device), the same meetings order the ranks' queues of work: a
// rank's counts are downloaded (which waits for the work that wrote its buffers) before it
// arrives, the copies out of the senders' buffers are queued on the receiver's queue and marked
// there, and after the second meeting each sender's queue waits for the marks of the ranks that
// read from it (its later work may overwrite the buffer): one host wait a collective, the download.
// all_to_all_v_along follows the last call's routes (remembered on every rank): no download; the
// sender marks the work that wrote its rows and the receivers' queues wait for that mark.
// In a graph pass (graph_pass: a capture, where nothing may wait on the host, or the pass that sizes
// it; or whenever the queue is capturing) the counts stay on the device (exchange_on_device): each
// receiver's queue reads them in one gather of its rows from every sender, and the meetings check
// buffers against the rows the senders hold instead of the counts.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstring>

#include "ballast/dist/data_plane_checks.h"
#include "ballast/dist/thread_world_state.h"

namespace ballast::dist {

namespace {

using thread_detail::Contribution;
using thread_detail::Fault;
using thread_detail::Op;
using thread_detail::Posted;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kThreadPlane = "thread";

class ThreadDataPlane final : public DataPlane {
 public:
  ThreadDataPlane(std::shared_ptr<ThreadWorld::State> s, int rank, std::unique_ptr<DeviceQueue> queue = nullptr)
      : s_(std::move(s)), rank_(rank), queue_(std::move(queue)) {}

  int rank() const override { return rank_; }
  int size() const override { return s_->size; }
  bool moves(Device device) const override { return device == where(); }
  bool shares_device() const override { return queue_ != nullptr; }
  void graph_pass(bool on) override { graph_pass_ = on; }
  std::unique_ptr<DataPlane> on_device(std::unique_ptr<DeviceQueue> queue) override {
    check(queue != nullptr, "thread data plane of rank {}: on_device without a device queue", rank_);
    return std::make_unique<ThreadDataPlane>(s_, rank_, std::move(queue));
  }

  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override {
    if (counts_on_device()) exchange_on_device(nullptr, send, send_counts, recv, recv_counts);
    else exchange(nullptr, send, send_counts, recv, recv_counts);
  }
  void all_to_all_v_along(Routes routes, const Tensor& send, const Tensor& send_counts, Tensor& recv,
                          Tensor& recv_counts) override {
    if (counts_on_device()) exchange_on_device(&routes, send, send_counts, recv, recv_counts);
    else exchange(&routes, send, send_counts, recv, recv_counts);
  }
  int64_t received_rows_at_most() const override { return last_received_; }

  void all_gather(const Tensor& mine, Tensor& all) override {
    const int G = s_->size;
    s_->throw_if_aborted(rank_);
    const auto error = detail::check_all_gather(rank_, G, mine, all, kThreadPlane, where());
    // The work that wrote `mine`, marked: the peers' copies out of it wait for it.
    const void* ready = queue_ && !error ? queue_->mark(0) : nullptr;
    m().mine[rank_] = Contribution{.op = Op::gather,
                                   .ptr = mine.raw(),
                                   .n = size_t(mine.numel()),
                                   .dtype = mine.dtype(),
                                   .ready = ready,
                                   .error = error ? &*error : nullptr};
    s_->meet(m(), rank_, Op::gather, [&] { return check_alike("all_gather"); });
    const size_t bytes = mine.nbytes();
    auto* out = static_cast<std::byte*>(all.raw());
    for (int src = 0; src < G; ++src) {
      const void* from = m().mine[src].ptr;
      if (bytes == 0 || from == out + src * bytes) continue;  // in place
      if (queue_) queue_->after(m().mine[src].ready);
      move(from, out + src * bytes, bytes);
    }
    if (queue_) m().marks[rank_] = queue_->mark(1);
    s_->meet(m(), rank_, Op::gather);
    if (queue_ && bytes > 0)
      for (int r = 0; r < G; ++r)
        if (r != rank_) queue_->after(m().marks[size_t(r)]);  // before `mine` may be overwritten
  }

  void all_reduce_sum(Tensor& data) override {
    const int G = s_->size;
    s_->throw_if_aborted(rank_);
    auto error = detail::check_all_reduce(rank_, data, kThreadPlane, where());
    if (!error && counts_on_device()) error = not_in_a_graph("all_reduce_sum");
    const size_t n = size_t(data.numel()), bytes = data.nbytes();
    const void* mine = data.raw();
    if (queue_ && !error && bytes > 0) {  // summed on the host
      staging_.resize(bytes);
      queue_->download(data.raw(), staging_.data(), bytes);
      mine = staging_.data();
    }
    m().mine[rank_] = Contribution{.op = Op::reduce,
                                   .ptr = mine,
                                   .n = n,
                                   .dtype = data.dtype(),
                                   .error = error ? &*error : nullptr};
    // The last rank to arrive sums in rank order, while the others wait (their data unchanged).
    s_->meet(m(), rank_, Op::reduce, [&]() -> std::optional<Fault> {
      check_alike("all_reduce_sum");
      if (!m().verdict.empty()) return std::nullopt;
      auto& sum = m().sum;
      sum.resize(bytes);
      if (bytes == 0) return std::nullopt;
      std::memcpy(sum.data(), m().mine[0].ptr, bytes);
      for (int r = 1; r < G; ++r) detail::add_into(data.dtype(), sum.data(), m().mine[r].ptr, n);
      return std::nullopt;
    });
    if (bytes > 0) from_host(m().sum.data(), data.raw(), bytes);
  }

  void send_recv(std::span<const Transfer> items) override {
    const int G = s_->size;
    s_->throw_if_aborted(rank_);
    // Its peers may be waiting for transfers it will never post: stop the world.
    auto bad = detail::check_transfers(rank_, G, items, kThreadPlane, where());
    if (!bad && counts_on_device()) bad = not_in_a_graph("send_recv");
    if (bad) s_->fail(rank_, *bad);
    if (queue_) queue_->wait();  // what it sends is written before a peer copies it
    const auto until = s_->deadline();
    // Receives by peer, in the order posted: the k-th from a peer takes its k-th send.
    std::vector<std::vector<const Transfer*>> wanted(G);
    size_t receives = 0;
    for (const auto& it : items)
      if (it.kind == Transfer::recv) {
        wanted[it.peer].push_back(&it);
        ++receives;
      }
    std::vector<Posted> posted;
    posted.reserve(items.size());  // addresses stay put: receivers hold them
    std::vector<int> posted_to;    // receiver of each send in its mailbox
    std::string mismatch;
    try {
      // Every send is posted before anything waits, so no order of items can deadlock.
      for (const auto& it : items) {
        if (it.kind != Transfer::send) continue;
        posted.push_back({static_cast<const std::byte*>(it.buffer.raw()), int64_t(it.buffer.nbytes())});
        auto& box = s_->mailboxes[it.peer];
        {
          std::lock_guard lk(box.mu);
          box.from[rank_].push_back(&posted.back());
        }
        posted_to.push_back(it.peer);
        box.cv.notify_all();
      }
      receive(wanted, receives, until, &mismatch);
      wait_taken(posted, posted_to, until);
    } catch (...) {
      withdraw(posted, posted_to);
      throw;
    }
    if (!mismatch.empty()) throw Error(mismatch);
  }

 private:
  thread_detail::Meeting& m() { return s_->data; }
  // A graph's pass, or a capture the queue is in anyway: nothing is read on the host.
  bool counts_on_device() const { return queue_ && (graph_pass_ || queue_->capturing()); }
  Device where() const { return queue_ ? queue_->device() : Device::CPU; }
  // Bytes between buffers of the plane's memory (any rank's): copied, or queued on the device.
  void move(const void* src, void* dst, size_t bytes) {
    if (queue_) queue_->copy(src, dst, bytes);
    else std::memcpy(dst, src, bytes);
  }

  // Bytes from the host into the plane's memory: copied, or queued on the device.
  void from_host(const void* host, void* dst, size_t bytes) {
    if (queue_) queue_->upload(host, dst, bytes);
    else std::memcpy(dst, host, bytes);
  }

  // all_to_all_v's own arguments and counts: read on the host (on a device downloaded, which also
  // waits for the work that wrote `send` before the peers may read it), or with `routes` those of
  // the last call (in host memory the caller's promise is checked).
  std::optional<std::string> check_rows(const Routes* routes, const Tensor& send, const Tensor& send_counts,
                                        const Tensor& recv, const Tensor& recv_counts, detail::RowArgs* a) {
    const int G = s_->size;
    if (auto bad = detail::check_row_buffers(rank_, G, send, send_counts, recv, recv_counts, kThreadPlane, where(), a))
      return bad;
    if (!routes) {
      if (!queue_) return detail::check_send_counts(rank_, {send_counts.data<int32_t>(), size_t(G)}, a);
      counts_.resize(size_t(G));
      queue_->download(send_counts.raw(), counts_.data(), 4 * size_t(G));
      return detail::check_send_counts(rank_, counts_, a);
    }
    const std::vector<int32_t>& known = *routes == Routes::again ? sent_routes_ : got_routes_;
    const char* which = routes_name(*routes);
    if (known.size() != size_t(G)) return nothing_to_follow(*routes);
    if (!queue_ && std::memcmp(send_counts.raw(), known.data(), 4 * size_t(G)) != 0) {
      const std::span<const int32_t> given(send_counts.data<int32_t>(), size_t(G));
      return fmt::format("all_to_all_v_along ({}): rank {}'s send_counts [{}] are not the last call's {} [{}]", which,
                         rank_, fmt::join(given, ", "), *routes == Routes::again ? "send counts" : "recv counts",
                         fmt::join(known, ", "));
    }
    return detail::check_send_counts(rank_, known, a);
  }

  // all_to_all_v, with the counts read (routes null) or known from the last call (routes).
  void exchange(const Routes* routes, const Tensor& send, const Tensor& send_counts, Tensor& recv,
                Tensor& recv_counts) {
    const int G = s_->size;
    s_->throw_if_aborted(rank_);
    detail::RowArgs a;
    // A rank with bad arguments still meets the others, so that all of them fail together.
    const auto error = check_rows(routes, send, send_counts, recv, recv_counts, &a);
    // Counts known without a download: the work that wrote `send` is marked for the receivers.
    const void* ready = queue_ && routes && !error ? queue_->mark(0) : nullptr;
    m().mine[rank_] = Contribution{.op = Op::all_to_all_v,
                                   .ptr = send.raw(),
                                   .dtype = a.dtype,
                                   .row_bytes = a.row_bytes,
                                   .counts = error ? nullptr : a.send_counts.data(),
                                   .recv_rows = a.recv_rows,
                                   .ready = ready,
                                   .error = error ? &*error : nullptr};
    s_->meet(m(), rank_, Op::all_to_all_v, [&]() -> std::optional<Fault> {
      auto& mine = m().mine;
      // The counts, copied (a rank may pass one tensor as send_counts and recv_counts); a rank
      // with bad arguments sends nothing.
      auto& matrix = m().matrix;
      matrix.assign(size_t(G) * G, 0);
      for (int src = 0; src < G; ++src)
        if (mine[src].counts)
          for (int dst = 0; dst < G; ++dst) matrix[size_t(src) * G + dst] = mine[src].counts[dst];
      std::vector<std::optional<std::string>> errors(G);
      std::vector<int64_t> from(G);
      for (int dst = 0; dst < G; ++dst) {
        if (mine[dst].error) {
          errors[dst] = *mine[dst].error;
          continue;
        }
        for (int src = 0; src < G; ++src) from[src] = matrix[size_t(src) * G + dst];
        errors[dst] = detail::check_recv_room(dst, from, mine[dst].recv_rows);
      }
      fail_rows(errors);
      return std::nullopt;
    });
    // Rows from each source, by source rank; a source's rows for this rank follow those it sends
    // to lower ranks.
    auto* out = static_cast<std::byte*>(recv.raw());
    counts_.resize(size_t(G));
    size_t at = 0;
    int64_t received = 0;
    for (int src = 0; src < G; ++src) {
      const int64_t* row = &m().matrix[size_t(src) * G];
      int64_t before = 0;
      for (int dst = 0; dst < rank_; ++dst) before += row[dst];
      const size_t bytes = size_t(row[rank_]) * a.row_bytes;
      if (bytes > 0) {
        if (queue_) queue_->after(m().mine[src].ready);
        move(static_cast<const std::byte*>(m().mine[src].ptr) + size_t(before) * a.row_bytes, out + at, bytes);
      }
      at += bytes;
      counts_[size_t(src)] = int32_t(row[rank_]);
      received += row[rank_];
    }
    from_host(counts_.data(), recv_counts.raw(), 4 * size_t(G));
    if (queue_) m().marks[rank_] = received > 0 ? queue_->mark(1) : nullptr;
    // The routes of this call, for the next along them.
    sent_routes_.assign(a.send_counts.begin(), a.send_counts.end());
    got_routes_ = counts_;
    last_received_ = received;
    last_sent_rows_ = a.rows_out;
    s_->meet(m(), rank_, Op::all_to_all_v);
    // What this rank queues next (a reuse of `send`) waits for the copies out of it.
    if (queue_)
      for (int dst = 0; dst < G; ++dst)
        if (a.send_counts[size_t(dst)] > 0) queue_->after(m().marks[size_t(dst)]);
  }

  // all_to_all_v in a graph pass: the counts stay on the device. The meeting checks every rank's
  // buffers against the rows its sources hold (or, along `back` routes, the rows it sent); each
  // receiver's queue waits for every sender's ready mark and gathers its rows in one op that reads
  // the counts; each sender's queue then waits for every receiver's done mark.
  void exchange_on_device(const Routes* routes, const Tensor& send, const Tensor& send_counts, Tensor& recv,
                          Tensor& recv_counts) {
    const int G = s_->size;
    s_->throw_if_aborted(rank_);
    detail::RowArgs a;
    auto error = detail::check_row_buffers(rank_, G, send, send_counts, recv, recv_counts, kThreadPlane, where(), &a);
    if (!error && routes && last_sent_rows_ < 0) error = nothing_to_follow(*routes);
    if (!error && send_counts.raw() == recv_counts.raw())
      error = fmt::format("all_to_all_v: rank {}'s send_counts is its recv_counts: in a graph its peers read the "
                          "counts on the device while it writes what it received",
                          rank_);
    const void* ready = error ? nullptr : queue_->mark(0);
    m().mine[rank_] = Contribution{.op = Op::all_to_all_v,
                                   .ptr = send.raw(),
                                   .dtype = a.dtype,
                                   .row_bytes = a.row_bytes,
                                   .recv_rows = a.recv_rows,
                                   .ready = ready,
                                   .device_counts = send_counts.raw(),
                                   .send_rows = a.send_rows,
                                   .receives_at_most = routes && *routes == Routes::back ? last_sent_rows_ : -1,
                                   .error = error ? &*error : nullptr};
    s_->meet(m(), rank_, Op::all_to_all_v, [&]() -> std::optional<Fault> {
      auto& mine = m().mine;
      std::vector<int64_t> from(G);  // what each source holds: what any rank may receive from it
      for (int src = 0; src < G; ++src) from[src] = mine[src].error ? 0 : mine[src].send_rows;
      std::vector<std::optional<std::string>> errors(G);
      for (int dst = 0; dst < G; ++dst) {
        if (mine[dst].error) {
          errors[dst] = *mine[dst].error;
          continue;
        }
        const int64_t most = mine[dst].receives_at_most;
        if (most >= 0) {
          if (most > mine[dst].recv_rows)
            errors[dst] = fmt::format("all_to_all_v_along (back): rank {} may receive the {} rows it sent, but its "
                                      "recv holds {}",
                                      dst, most, mine[dst].recv_rows);
        } else if (auto bad = detail::check_recv_room(dst, from, mine[dst].recv_rows)) {
          errors[dst] = *bad + " (counts on the device, in a graph: recv holds every row its sources hold)";
        }
      }
      fail_rows(errors);
      return std::nullopt;
    });
    std::vector<DeviceQueue::Routed> sources(G);
    int64_t most = 0;
    for (int src = 0; src < G; ++src) {
      const Contribution& c = m().mine[src];
      sources[src] = {c.ptr, c.send_rows, c.device_counts};
      most += c.send_rows;
      queue_->after(c.ready);
    }
    queue_->gather_routed(sources, rank_, a.row_bytes, recv.raw(), a.recv_rows, recv_counts.raw());
    m().marks[rank_] = queue_->mark(1);
    // The routes are on the device: a later call along them on the host has none to follow.
    sent_routes_.clear();
    got_routes_.clear();
    last_received_ = m().mine[rank_].receives_at_most >= 0 ? m().mine[rank_].receives_at_most : most;
    last_sent_rows_ = a.send_rows;
    s_->meet(m(), rank_, Op::all_to_all_v);
    // What this rank queues next (a reuse of `send`) waits for every receiver's gather.
    for (int dst = 0; dst < G; ++dst)
      if (dst != rank_) queue_->after(m().marks[size_t(dst)]);
  }

  static const char* routes_name(Routes routes) { return routes == Routes::again ? "again" : "back"; }
  std::string nothing_to_follow(Routes routes) const {
    return fmt::format("all_to_all_v_along ({}): rank {} has made no all_to_all_v to follow", routes_name(routes),
                       rank_);
  }
  std::string not_in_a_graph(std::string_view call) const {
    return fmt::format("{}: rank {}'s device queue is in a graph pass, and {} waits on the host", call, rank_, call);
  }

  // Verdicts, written by the last rank to arrive. When some ranks' arguments are bad, every rank
  // fails: those with their own error throw it, the others name the first rank that has one.
  // Returns whether any failed.
  bool fail_ranks(const std::vector<std::optional<std::string>>& errors) {
    int first = -1;
    for (int r = 0; r < s_->size && first < 0; ++r)
      if (errors[r]) first = r;
    if (first < 0) return false;
    auto& v = m().verdict;
    v.resize(s_->size);
    for (int r = 0; r < s_->size; ++r)
      v[r] = errors[r] ? *errors[r] : fmt::format("rank {} failed: {}", first, *errors[first]);
    return true;
  }
  // all_to_all_v's verdict: each rank's own errors, then the same row layout on every rank.
  void fail_rows(const std::vector<std::optional<std::string>>& errors) {
    if (fail_ranks(errors)) return;
    std::vector<detail::Layout> layouts(s_->size);
    for (int r = 0; r < s_->size; ++r) layouts[r] = {int64_t(m().mine[r].row_bytes), m().mine[r].dtype};
    fail_all(detail::check_same_layout("all_to_all_v", layouts, true));
  }
  // When no rank alone is at fault (they disagree), every rank throws the same.
  void fail_all(const std::optional<std::string>& error) {
    if (error) m().verdict.assign(s_->size, *error);
  }
  // all_gather's and all_reduce_sum's: each rank's own errors, then rank 0's element count and
  // dtype on every rank.
  std::optional<Fault> check_alike(std::string_view call) {
    const int G = s_->size;
    std::vector<std::optional<std::string>> errors(G);
    for (int r = 0; r < G; ++r)
      if (m().mine[r].error) errors[r] = *m().mine[r].error;
    if (fail_ranks(errors)) return std::nullopt;
    std::vector<detail::Layout> layouts(G);
    for (int r = 0; r < G; ++r) layouts[r] = {int64_t(m().mine[r].n), m().mine[r].dtype};
    fail_all(detail::check_same_layout(call, layouts, false));
    return std::nullopt;
  }

  // Takes sends from this rank's mailbox as they come, from whichever peer, until every receive is
  // filled (so a slow peer holds up only its own transfers).
  void receive(const std::vector<std::vector<const Transfer*>>& wanted, size_t left,
               const std::optional<Clock::time_point>& until, std::string* mismatch) {
    const int G = s_->size;
    auto& box = s_->mailboxes[rank_];
    std::vector<size_t> next(G, 0);
    while (left > 0) {
      int src = -1;
      Posted* p = nullptr;
      {
        std::unique_lock lk(box.mu);
        auto find = [&] {
          for (int q = 0; q < G; ++q)
            if (next[q] < wanted[q].size() && !box.from[q].empty()) {
              src = q;
              return true;
            }
          return false;
        };
        auto ready = [&] { return s_->aborted.load() || find(); };
        if (until) {
          if (!box.cv.wait_until(lk, *until, ready)) {
            int q = 0;
            while (next[q] == wanted[q].size()) ++q;
            lk.unlock();
            s_->abort({fmt::format("rank {} waited {} ms in send_recv for {} bytes from rank {}; {} receive(s) "
                                   "still missing",
                                   rank_, s_->timeout.count(), wanted[q][next[q]]->buffer.nbytes(), q, left)});
            s_->throw_aborted(rank_);
          }
        } else {
          box.cv.wait(lk, ready);
        }
        if (s_->aborted.load()) {
          lk.unlock();
          s_->throw_aborted(rank_);
        }
        p = box.from[src].front();
        box.from[src].pop_front();
      }
      const Transfer& t = *wanted[src][next[src]++];
      const int64_t sent = p->bytes, expected = int64_t(t.buffer.nbytes());
      if (sent == expected && sent > 0) {
        move(p->data, t.buffer.raw(), size_t(sent));
        if (queue_) queue_->wait();  // before its sender may reuse the buffer
      }
      taken(src, p);
      // As with MPI: the send is consumed (its sender goes on), and the receiver reports the first
      // mismatch once everything else of its call is done.
      if (sent != expected && mismatch->empty()) *mismatch = detail::transfer_size_mismatch(rank_, expected, src, sent);
      --left;
    }
  }

  // Tells `sender` that p was copied out; p may be gone as soon as the lock is released.
  void taken(int sender, Posted* p) {
    auto& box = s_->mailboxes[sender];
    {
      std::lock_guard lk(box.mu);
      p->done = true;
    }
    box.cv.notify_all();
  }

  void wait_taken(const std::vector<Posted>& posted, const std::vector<int>& to,
                  const std::optional<Clock::time_point>& until) {
    auto& box = s_->mailboxes[rank_];
    std::unique_lock lk(box.mu);
    auto all_taken = [&] {
      return std::all_of(posted.begin(), posted.end(), [](const Posted& p) { return p.done; });
    };
    auto ready = [&] { return s_->aborted.load() || all_taken(); };
    if (until) {
      if (!box.cv.wait_until(lk, *until, ready)) {
        size_t i = 0;
        while (posted[i].done) ++i;
        const auto waiting = std::count_if(posted.begin(), posted.end(), [](const Posted& p) { return !p.done; });
        lk.unlock();
        s_->abort({fmt::format("rank {} waited {} ms in send_recv for rank {} to receive {} bytes; {} send(s) "
                               "not received",
                               rank_, s_->timeout.count(), to[i], posted[i].bytes, waiting)});
        s_->throw_aborted(rank_);
      }
    } else {
      box.cv.wait(lk, ready);
    }
    if (s_->aborted.load()) {
      lk.unlock();
      s_->throw_aborted(rank_);
    }
  }

  // On the way out with an error: takes back the sends no receiver has seen, and waits for those
  // being copied right now (a copy does not block), so that no receiver reads a buffer we return.
  void withdraw(const std::vector<Posted>& posted, const std::vector<int>& to) noexcept {
    std::vector<bool> gone(to.size(), false);
    for (size_t i = 0; i < to.size(); ++i) {
      auto& box = s_->mailboxes[to[i]];
      std::lock_guard lk(box.mu);
      auto& q = box.from[rank_];
      auto it = std::find(q.begin(), q.end(), &posted[i]);
      if (it != q.end()) {
        q.erase(it);
        gone[i] = true;
      }
    }
    auto& box = s_->mailboxes[rank_];
    std::unique_lock lk(box.mu);
    box.cv.wait(lk, [&] {
      for (size_t i = 0; i < to.size(); ++i)
        if (!gone[i] && !posted[i].done) return false;
      return true;
    });
  }

  std::shared_ptr<ThreadWorld::State> s_;
  int rank_;
  std::unique_ptr<DeviceQueue> queue_;  // null: host buffers
  std::vector<int32_t> counts_;         // a call's counts on the host (sent, then received)
  std::vector<int32_t> sent_routes_, got_routes_;  // the last all_to_all_v's send and recv counts
  std::vector<std::byte> staging_;      // all_reduce_sum's data on the host, from a device
  int64_t last_received_ = -1;
  int64_t last_sent_rows_ = -1;  // the rows the last all_to_all_v sent (at most, counts on the device)
  bool graph_pass_ = false;      // graph_pass(true) until graph_pass(false)
};

}  // namespace

std::unique_ptr<DataPlane> make_thread_data_plane(std::shared_ptr<ThreadWorld::State> state, int rank) {
  return std::make_unique<ThreadDataPlane>(std::move(state), rank);
}

}  // namespace ballast::dist
