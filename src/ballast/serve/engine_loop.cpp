#include "ballast/serve/engine_loop.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast::serve {

namespace {

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Outcome outcome_of(runtime::FinishReason r) {
  switch (r) {
    case runtime::FinishReason::stop: return Outcome::stop;
    case runtime::FinishReason::length: return Outcome::length;
    default: return Outcome::abort;
  }
}

DomainFigures figures_of(const moe::ExpertParallelDomain& d) {
  DomainFigures f;
  const auto& rb = d.rebalancer;
  if (!rb.balancedness().empty()) f.balancedness = rb.balancedness().back();
  for (const auto& e : rb.events()) {
    ++f.rebalances;
    f.experts_moved += e.experts_moved;
    f.bytes_moved += e.bytes_moved;
    if (e.done) f.rebalance_seconds += e.total_seconds;
  }
  return f;
}

}  // namespace

EngineLoop::EngineLoop(runtime::Engine& engine, dist::Communicator* comm, RequestQueue* queue,
                       ServerMetrics* metrics, LoopOptions options)
    : engine_(engine), comm_(comm), queue_(queue), metrics_(metrics), opt_(options),
      rank_load_(size_t(comm ? comm->size() : 1), 0) {
  check((queue == nullptr) == (metrics == nullptr), "serve: rank 0 needs both the queue and the metrics");
  check(!comm || (comm->rank() == 0) == (queue != nullptr), "serve: rank 0, and only rank 0, takes requests");
}

dist::Bytes EngineLoop::broadcast(dist::Bytes mine) {
  if (!comm_) return mine;
  return std::move(comm_->all_gather(mine)[0]);
}

std::vector<dist::Bytes> EngineLoop::gather(dist::Bytes mine) {
  if (!comm_) return {std::move(mine)};
  return comm_->all_gather(mine);
}

void EngineLoop::run() {
  try {
    for (;;) {
      const PassPlan plan = decode_plan(broadcast(serving() ? encode(plan_next()) : dist::Bytes{}));
      std::vector<CommandResult> results;
      bool ran = false;
      const RankReport report = apply(plan, results, ran);
      const std::vector<dist::Bytes> reports = gather(encode(report));
      if (serving()) collect(reports, results, ran);
      if (plan.stop) return;
    }
  } catch (const std::exception& e) {
    if (serving()) fail_all(fmt::format("engine error: {}", e.what()));
    throw;
  }
}

int EngineLoop::least_loaded_rank() const {
  return int(std::min_element(rank_load_.begin(), rank_load_.end()) - rank_load_.begin());
}

PassPlan EngineLoop::plan_next() {
  PassPlan plan;
  RequestQueue::Taken t = queue_->take(in_flight_.empty() ? opt_.idle_wait : std::chrono::milliseconds(0));
  for (Submission& s : t.submitted) {
    const int rank = least_loaded_rank();
    ++rank_load_[size_t(rank)];
    metrics_->prompt_tokens(int64_t(s.request.prompt.size()));
    in_flight_[s.id] = {s.stream, rank, s.arrival, {}, s.deadline, 0, std::nullopt};
    plan.joins.push_back({s.id, rank, std::move(s.request)});
  }
  auto abort = [&](uint64_t id, InFlight& f, Outcome why) {
    if (f.ending) return;
    f.ending = why;
    plan.aborts.push_back(id);
  };
  for (const auto& [id, why] : t.cancelled)
    if (auto it = in_flight_.find(id); it != in_flight_.end()) abort(id, it->second, why);
  const Clock::time_point now = Clock::now();
  for (auto& [id, f] : in_flight_)
    if (f.deadline && now >= *f.deadline) abort(id, f, Outcome::timeout);
  if (!queue_->accepting()) {
    if (!drain_until_) drain_until_ = now + opt_.drain_timeout;
    if (now >= *drain_until_)
      for (auto& [id, f] : in_flight_) abort(id, f, Outcome::abort);
  }
  for (auto& [c, promise] : t.commands) {
    if (c == Command::flush_cache) {
      // Nothing is cached across requests (no prefix cache): between requests the KV cache holds
      // nothing, which is what is checked here (SGLang's answer while requests run).
      const bool idle = in_flight_.empty() && used_blocks_ == 0;
      promise.set_value({idle, idle ? "Cache flushed." : "Cache not flushed: requests are running or waiting."});
      continue;
    }
    plan.commands.push_back(c);
    awaiting_.push_back(std::move(promise));
  }
  plan.stop = !queue_->accepting() && in_flight_.empty() && plan.joins.empty();
  return plan;
}

CommandResult EngineLoop::run_command(Command c) {
  auto* trunk = engine_.trunk_ep();
  if (!trunk) return {false, "no expert-parallel domain to record: the engine runs without expert parallelism", {}};
  eplb::Recorder& rec = trunk->domain.recorder;
  switch (c) {
    case Command::start_record:
      rec.reset();
      rec.start();
      return {true, "Start recording the expert distribution.", {}};
    case Command::stop_record:
      // Rebalancing plans from the recorder's window: it keeps recording while EPLB is on.
      if (trunk->domain.options.rebalance.enabled)
        return {false, "the recorder feeds EPLB's rebalancing (--enable-eplb) and keeps recording", {}};
      rec.stop();
      return {true, "Stop recording the expert distribution.", {}};
    case Command::dump_record:
      // Every pass's load is summed over ranks before it is recorded: one rank holds all of it.
      return {true, "Dump the expert distribution.", rec.dump()};
    case Command::flush_cache: break;
  }
  return {false, "unknown command", {}};
}

RankReport EngineLoop::apply(const PassPlan& plan, std::vector<CommandResult>& results, bool& ran) {
  const int me = comm_ ? comm_->rank() : 0;
  RankReport rep;
  for (const PassPlan::Join& j : plan.joins) {
    if (j.rank != me) continue;
    try {
      const int64_t local = engine_.add_request(j.request);
      local_[j.id] = local;
      global_[local] = j.id;
    } catch (const std::exception& e) {
      rep.refused.emplace_back(j.id, e.what());
    }
  }
  for (uint64_t id : plan.aborts)
    if (auto it = local_.find(id); it != local_.end()) engine_.abort(it->second);
  for (Command c : plan.commands) {
    CommandResult r = run_command(c);
    if (c == Command::dump_record && me != 0) r.load.reset();
    results.push_back(std::move(r));
  }

  ran = engine_.step();
  for (const runtime::StepOutput& o : engine_.outputs()) {
    const auto it = global_.find(o.id);
    if (it == global_.end()) continue;
    rep.outputs.push_back({it->second, o.tokens, o.logprobs, o.finished, o.reason});
    if (o.finished) {
      local_.erase(it->second);
      global_.erase(it);
    }
  }
  auto& cache = engine_.cache();
  auto& sched = engine_.scheduler();
  rep.running = int64_t(sched.running());
  rep.waiting = int64_t(sched.waiting());
  rep.total_blocks = cache.total_blocks();
  rep.used_blocks = cache.total_blocks() - cache.free_blocks();
  rep.preemptions = sched.preemptions();
  rep.spec_rounds = engine_.speculative_stats().rounds;
  rep.spec_emitted = engine_.speculative_stats().emitted;
  return rep;
}

void EngineLoop::end(uint64_t id, Outcome outcome, const std::string& error) {
  const auto it = in_flight_.find(id);
  if (it == in_flight_.end()) return;
  InFlight& f = it->second;
  const Clock::time_point now = Clock::now();
  const double tpot = f.tokens > 1 ? seconds(now - f.first_token) / double(f.tokens - 1) : -1.0;
  metrics_->finished(outcome, seconds(now - f.arrival), tpot);
  f.stream->finish(outcome, error);
  --rank_load_[size_t(f.rank)];
  in_flight_.erase(it);
  queue_->release();
}

void EngineLoop::collect(const std::vector<dist::Bytes>& reports, std::vector<CommandResult>& results, bool ran) {
  for (size_t i = 0; i < awaiting_.size(); ++i)
    awaiting_[i].set_value(i < results.size() ? std::move(results[i]) : CommandResult{false, "not run", {}});
  awaiting_.clear();

  int64_t waiting = int64_t(queue_->waiting()), running = 0, used = 0, total = 0, preemptions = 0, rounds = 0,
          emitted = 0;
  const Clock::time_point now = Clock::now();
  for (const dist::Bytes& bytes : reports) {
    const RankReport rep = decode_report(bytes);
    for (const auto& [id, why] : rep.refused) end(id, Outcome::error, why);
    for (const RankReport::Output& o : rep.outputs) {
      const auto it = in_flight_.find(o.id);
      if (it == in_flight_.end()) continue;
      InFlight& f = it->second;
      if (!o.tokens.empty()) {
        if (f.tokens == 0) {
          f.first_token = now;
          metrics_->first_token(seconds(now - f.arrival));
        }
        f.tokens += int64_t(o.tokens.size());
        metrics_->generated_tokens(int64_t(o.tokens.size()));
        f.stream->push(o.tokens, o.logprobs);
      }
      if (o.finished) end(o.id, f.ending.value_or(outcome_of(o.reason)));
    }
    waiting += rep.waiting;
    running += rep.running;
    used += rep.used_blocks;
    total += rep.total_blocks;
    preemptions += rep.preemptions;
    rounds += rep.spec_rounds;
    emitted += rep.spec_emitted;
  }
  used_blocks_ = used;
  if (ran) metrics_->pass();
  metrics_->state(waiting, running, total > 0 ? double(used) / double(total) : 0.0, preemptions);
  metrics_->speculation(rounds, emitted);
  // Every rank decides rebalances on the same summed loads: rank 0's domains speak for all.
  if (auto* d = engine_.trunk_ep()) metrics_->domain("trunk", figures_of(*d));
  if (auto* d = engine_.mtp_ep()) metrics_->domain("mtp", figures_of(*d));
}

void EngineLoop::fail_all(const std::string& why) {
  queue_->stop_accepting();
  for (auto& p : awaiting_) p.set_value({false, why, {}});
  awaiting_.clear();
  while (!in_flight_.empty()) end(in_flight_.begin()->first, Outcome::error, why);
}

}  // namespace ballast::serve
