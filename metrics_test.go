package imgcache

import (
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

type fixedStats Stats

func (f fixedStats) Stats() Stats { return Stats(f) }

func TestCollectorExportsEveryCounter(t *testing.T) {
	src := fixedStats{L1Hits: 1, L2Hits: 2, Misses: 3, NegativeHits: 4, Coalesced: 5, Loads: 6,
		LoadErrors: 7, L2Errors: 8, L2Unreadable: 9, EncodeErrors: 10, L1Evictions: 11, L1Entries: 12,
		L2Stale: 13, LoadsSuperseded: 14, L1Flushes: 15, BusSent: 16, BusReceived: 17, BusResubscribes: 18, BusErrors: 19,
		L2BreakerOpen: true, BreakerTrips: 20, L2Skipped: 21, HitRateGuardOpen: false, HitRateGuardTrips: 22,
		StaleServed: 23, Refreshes: 24, LockWaits: 25, LoadTimeouts: 26, L2Batched: 27}
	want := `
# HELP imgcache_bus_errors_total Invalidation bus messages that could not be decoded.
# TYPE imgcache_bus_errors_total counter
imgcache_bus_errors_total{cache="img"} 19
# HELP imgcache_bus_messages_total Invalidation bus messages.
# TYPE imgcache_bus_messages_total counter
imgcache_bus_messages_total{cache="img",direction="received"} 17
imgcache_bus_messages_total{cache="img",direction="sent"} 16
# HELP imgcache_bus_resubscribes_total Invalidation bus subscriptions re-established after a disconnection.
# TYPE imgcache_bus_resubscribes_total counter
imgcache_bus_resubscribes_total{cache="img"} 18
# HELP imgcache_coalesced_total GetOrLoad calls that joined a load already in flight.
# TYPE imgcache_coalesced_total counter
imgcache_coalesced_total{cache="img"} 5
# HELP imgcache_encode_errors_total Loaded values not cached because they could not be encoded.
# TYPE imgcache_encode_errors_total counter
imgcache_encode_errors_total{cache="img"} 10
# HELP imgcache_hits_total Lookups answered by a cache level.
# TYPE imgcache_hits_total counter
imgcache_hits_total{cache="img",level="l1"} 1
imgcache_hits_total{cache="img",level="l2"} 2
# HELP imgcache_hit_rate_guard_open 1 while the hit-rate guard skips Redis reads.
# TYPE imgcache_hit_rate_guard_open gauge
imgcache_hit_rate_guard_open{cache="img"} 0
# HELP imgcache_hit_rate_guard_trips_total Times the hit-rate guard tripped.
# TYPE imgcache_hit_rate_guard_trips_total counter
imgcache_hit_rate_guard_trips_total{cache="img"} 22
# HELP imgcache_l1_entries Entries in the in-process level.
# TYPE imgcache_l1_entries gauge
imgcache_l1_entries{cache="img"} 12
# HELP imgcache_l1_flushes_total Times L1 was emptied after the invalidation bus (re)subscribed.
# TYPE imgcache_l1_flushes_total counter
imgcache_l1_flushes_total{cache="img"} 15
# HELP imgcache_l1_evictions_total Entries the in-process level dropped to make room.
# TYPE imgcache_l1_evictions_total counter
imgcache_l1_evictions_total{cache="img"} 11
# HELP imgcache_l2_batched_reads_total Redis reads that shared one round trip with other concurrent reads.
# TYPE imgcache_l2_batched_reads_total counter
imgcache_l2_batched_reads_total{cache="img"} 27
# HELP imgcache_l2_breaker_open 1 while the Redis circuit breaker is open.
# TYPE imgcache_l2_breaker_open gauge
imgcache_l2_breaker_open{cache="img"} 1
# HELP imgcache_l2_breaker_trips_total Times the Redis circuit breaker opened.
# TYPE imgcache_l2_breaker_trips_total counter
imgcache_l2_breaker_trips_total{cache="img"} 20
# HELP imgcache_l2_errors_total Failed Redis calls and unreadable Redis values.
# TYPE imgcache_l2_errors_total counter
imgcache_l2_errors_total{cache="img"} 8
# HELP imgcache_l2_skipped_total Redis calls skipped by the breaker or the hit-rate guard.
# TYPE imgcache_l2_skipped_total counter
imgcache_l2_skipped_total{cache="img"} 21
# HELP imgcache_l2_stale_total Redis values found invalidated by their entity's or a tag's generation.
# TYPE imgcache_l2_stale_total counter
imgcache_l2_stale_total{cache="img"} 13
# HELP imgcache_l2_unreadable_total Redis values that did not decode (codec, version or corruption).
# TYPE imgcache_l2_unreadable_total counter
imgcache_l2_unreadable_total{cache="img"} 9
# HELP imgcache_load_timeouts_total Loads that reached LoadTimeout.
# TYPE imgcache_load_timeouts_total counter
imgcache_load_timeouts_total{cache="img"} 26
# HELP imgcache_load_errors_total Loads that failed with an error other than not-found.
# TYPE imgcache_load_errors_total counter
imgcache_load_errors_total{cache="img"} 7
# HELP imgcache_loads_total Calls of a GetOrLoad loader.
# TYPE imgcache_loads_total counter
imgcache_loads_total{cache="img"} 6
# HELP imgcache_lock_waits_total Loads another instance did for this one through the distributed lease.
# TYPE imgcache_lock_waits_total counter
imgcache_lock_waits_total{cache="img"} 25
# HELP imgcache_loads_superseded_total Loads whose Redis write was taken back because an invalidation ran meanwhile.
# TYPE imgcache_loads_superseded_total counter
imgcache_loads_superseded_total{cache="img"} 14
# HELP imgcache_misses_total Lookups that neither level could answer.
# TYPE imgcache_misses_total counter
imgcache_misses_total{cache="img"} 3
# HELP imgcache_negative_hits_total Hits on a remembered not-found.
# TYPE imgcache_negative_hits_total counter
imgcache_negative_hits_total{cache="img"} 4
# HELP imgcache_refreshes_total Background loads started by early refresh or a soft timeout.
# TYPE imgcache_refreshes_total counter
imgcache_refreshes_total{cache="img"} 24
# HELP imgcache_stale_served_total Stale values served in place of a failed or slow load.
# TYPE imgcache_stale_served_total counter
imgcache_stale_served_total{cache="img"} 23
`
	if err := testutil.CollectAndCompare(NewCollector("img", src), strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	// Two caches register side by side under different names; the lint finds nothing to fix.
	reg := prometheus.NewPedanticRegistry()
	if err := errors.Join(reg.Register(NewCollector("a", src)), reg.Register(NewCollector("b", src))); err != nil {
		t.Fatal(err)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// countingSrc counts Stats calls: the collector must read one snapshot per scrape.
type countingSrc struct{ n int }

func (c *countingSrc) Stats() Stats { c.n++; return Stats{} }

func TestCollectorReadsOneSnapshotPerScrape(t *testing.T) {
	src := &countingSrc{}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector("img", src))
	if _, err := reg.Gather(); err != nil {
		t.Fatal(err)
	}
	if src.n != 1 {
		t.Errorf("one scrape called Stats %d times, want 1", src.n)
	}
}

func TestHitRate(t *testing.T) {
	for _, tt := range []struct {
		s    Stats
		want float64
	}{
		{Stats{}, 0},
		{Stats{Misses: 4}, 0},
		{Stats{L1Hits: 3, L2Hits: 1}, 1},
		{Stats{L1Hits: 2, L2Hits: 1, Misses: 1, Coalesced: 100}, 0.75},
	} {
		if got := tt.s.HitRate(); got != tt.want {
			t.Errorf("%+v.HitRate() = %v, want %v", tt.s, got, tt.want)
		}
	}
}
