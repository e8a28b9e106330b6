package imgcache

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Stats is a snapshot of a cache's counters since New. Counters only grow; take two snapshots and
// subtract to see a rate. Every count is exact under concurrency.
type Stats struct {
	// Lookups. Every Get or GetOrLoad ends in one of: an L1 hit, an L2 hit, a miss, or (GetOrLoad
	// only) joining a load another caller started.
	L1Hits       uint64 // answered from the in-process level
	L2Hits       uint64 // answered from Redis
	Misses       uint64 // neither level had the key: Get returned ErrNotFound, or GetOrLoad loaded
	NegativeHits uint64 // hits, counted above too, on a remembered "not found"
	Coalesced    uint64 // GetOrLoad calls that joined a load already in flight for their key

	// Loads.
	Loads      uint64 // calls of a GetOrLoad loader
	LoadErrors uint64 // loads that failed with an error other than ErrNotFound (not cached)

	// Levels.
	L2Errors     uint64 // failed Redis calls, unreadable values included
	L2Unreadable uint64 // values in Redis that did not decode: another codec, version or corruption
	L2Batched    uint64 // Redis reads that shared one round trip with other concurrent reads (read batching)
	EncodeErrors uint64 // loaded values not cached because the codec failed or MaxValueSize was exceeded
	L1Evictions  uint64 // entries L1 dropped to make room (not expiries or deletions)
	L1Entries    uint64 // entries in L1 now, expired ones not yet removed included

	// Invalidation.
	L2Stale         uint64 // values in Redis found invalidated (their entity's or a tag's generation moved, or its bookkeeping was evicted)
	LoadsSuperseded uint64 // loads whose Redis write was taken back because a Delete, Set or InvalidatePattern ran meanwhile
	L1Flushes       uint64 // times L1 was emptied because the bus (re)subscribed and messages may have been missed
	BusSent         uint64 // invalidation messages this instance published
	BusReceived     uint64 // messages from other instances applied to L1
	BusResubscribes uint64 // subscriptions re-established after a disconnection (each flushes L1)
	BusErrors       uint64 // messages that could not be decoded

	// Resilience.
	L2BreakerOpen     bool   // the circuit breaker is open: Redis is being left alone
	BreakerTrips      uint64 // times the breaker opened
	L2Skipped         uint64 // Redis calls skipped by the open breaker or reads skipped by the hit-rate guard
	HitRateGuardOpen  bool   // the hit-rate guard is skipping Redis reads
	HitRateGuardTrips uint64 // times the hit-rate guard tripped
	StaleServed       uint64 // GetOrLoad results that were stale values served in place of a failed or slow load
	Refreshes         uint64 // background loads started by early refresh or a soft timeout
	LockWaits         uint64 // loads another instance did for this one, through the distributed lease
	LoadTimeouts      uint64 // loads that reached LoadTimeout
}

// HitRate returns hits / (hits + misses) over both levels, or 0 before the first lookup. Coalesced
// calls are not counted: the load they joined is one miss.
func (s Stats) HitRate() float64 {
	hits := s.L1Hits + s.L2Hits
	if hits+s.Misses == 0 {
		return 0
	}
	return float64(hits) / float64(hits+s.Misses)
}

// counters are the cache's own atomic counters; L1 hits and evictions live in the L1 shards.
type counters struct {
	l2Hits, misses, negativeHits, coalesced atomic.Uint64
	loads, loadErrors                       atomic.Uint64
	l2Errors, l2Unreadable, encodeErrors    atomic.Uint64
	l2Stale, loadsSuperseded, l1Flushes     atomic.Uint64
	busSent, busReceived, busResubscribes   atomic.Uint64
	busErrors                               atomic.Uint64
	staleServed, refreshes, lockWaits       atomic.Uint64
	loadTimeouts                            atomic.Uint64
}

// Stats returns a snapshot of the counters. It works after Close too.
func (c *Cache[V]) Stats() Stats {
	s := Stats{
		L2Hits:       c.stats.l2Hits.Load(),
		Misses:       c.stats.misses.Load(),
		NegativeHits: c.stats.negativeHits.Load(),
		Coalesced:    c.stats.coalesced.Load(),
		Loads:        c.stats.loads.Load(),
		LoadErrors:   c.stats.loadErrors.Load(),
		L2Errors:     c.stats.l2Errors.Load(),
		L2Unreadable: c.stats.l2Unreadable.Load(),
		EncodeErrors: c.stats.encodeErrors.Load(),

		L2Stale:         c.stats.l2Stale.Load(),
		LoadsSuperseded: c.stats.loadsSuperseded.Load(),
		L1Flushes:       c.stats.l1Flushes.Load(),
		BusSent:         c.stats.busSent.Load(),
		BusReceived:     c.stats.busReceived.Load(),
		BusResubscribes: c.stats.busResubscribes.Load(),
		BusErrors:       c.stats.busErrors.Load(),

		StaleServed:  c.stats.staleServed.Load(),
		Refreshes:    c.stats.refreshes.Load(),
		LockWaits:    c.stats.lockWaits.Load(),
		LoadTimeouts: c.stats.loadTimeouts.Load(),
	}
	if c.l2 != nil && c.l2.brk != nil {
		s.L2BreakerOpen = c.l2.brk.open()
		s.BreakerTrips = c.l2.brk.trips.Load()
		s.L2Skipped = c.l2.brk.skipped.Load()
	}
	if c.l2 != nil {
		s.L2Batched = c.l2.reads.batched.Load()
	}
	if c.guard != nil {
		s.HitRateGuardOpen = c.guard.open()
		s.HitRateGuardTrips = c.guard.trips.Load()
		s.L2Skipped += c.guard.skipped.Load()
	}
	if c.l1 != nil {
		s.L1Hits, s.L1Evictions, s.L1Entries = c.l1.counts()
	}
	return s
}

// NewCollector returns a Prometheus collector for a cache (or anything with a Stats method), with the
// constant label cache=name. It reads one Stats snapshot per scrape; the cache itself never calls
// Prometheus. Register it once per cache:
//
//	prometheus.MustRegister(imgcache.NewCollector("avatars", c))
//
// It exports imgcache_hits_total{level="l1"|"l2"}, imgcache_misses_total, imgcache_loads_total,
// imgcache_load_errors_total, imgcache_l2_errors_total, imgcache_l1_evictions_total,
// imgcache_negative_hits_total, imgcache_coalesced_total, imgcache_l2_unreadable_total,
// imgcache_encode_errors_total, imgcache_l2_batched_reads_total, imgcache_l2_stale_total, imgcache_loads_superseded_total,
// imgcache_l1_flushes_total, imgcache_bus_messages_total{direction="sent"|"received"},
// imgcache_bus_resubscribes_total, imgcache_bus_errors_total, imgcache_l2_breaker_trips_total,
// imgcache_l2_skipped_total, imgcache_hit_rate_guard_trips_total, imgcache_stale_served_total,
// imgcache_refreshes_total, imgcache_lock_waits_total, imgcache_load_timeouts_total, and the gauges
// imgcache_l1_entries, imgcache_l2_breaker_open and imgcache_hit_rate_guard_open (0 or 1).
func NewCollector(name string, src interface{ Stats() Stats }) prometheus.Collector {
	labels := prometheus.Labels{"cache": name}
	d := func(metric, help string, varLabels ...string) *prometheus.Desc {
		return prometheus.NewDesc("imgcache_"+metric, help, varLabels, labels)
	}
	return &collector{
		src:          src,
		hits:         d("hits_total", "Lookups answered by a cache level.", "level"),
		misses:       d("misses_total", "Lookups that neither level could answer."),
		loads:        d("loads_total", "Calls of a GetOrLoad loader."),
		loadErrors:   d("load_errors_total", "Loads that failed with an error other than not-found."),
		l2Errors:     d("l2_errors_total", "Failed Redis calls and unreadable Redis values."),
		l1Evictions:  d("l1_evictions_total", "Entries the in-process level dropped to make room."),
		negativeHits: d("negative_hits_total", "Hits on a remembered not-found."),
		coalesced:    d("coalesced_total", "GetOrLoad calls that joined a load already in flight."),
		l2Unreadable: d("l2_unreadable_total", "Redis values that did not decode (codec, version or corruption)."),
		encodeErrors: d("encode_errors_total", "Loaded values not cached because they could not be encoded."),
		l2Batched:    d("l2_batched_reads_total", "Redis reads that shared one round trip with other concurrent reads."),
		l1Entries:    d("l1_entries", "Entries in the in-process level."),
		l2Stale:      d("l2_stale_total", "Redis values found invalidated by their entity's or a tag's generation."),
		superseded:   d("loads_superseded_total", "Loads whose Redis write was taken back because an invalidation ran meanwhile."),
		l1Flushes:    d("l1_flushes_total", "Times L1 was emptied after the invalidation bus (re)subscribed."),
		bus:          d("bus_messages_total", "Invalidation bus messages.", "direction"),
		busResubs:    d("bus_resubscribes_total", "Invalidation bus subscriptions re-established after a disconnection."),
		busErrors:    d("bus_errors_total", "Invalidation bus messages that could not be decoded."),
		breakerOpen:  d("l2_breaker_open", "1 while the Redis circuit breaker is open."),
		breakerTrips: d("l2_breaker_trips_total", "Times the Redis circuit breaker opened."),
		l2Skipped:    d("l2_skipped_total", "Redis calls skipped by the breaker or the hit-rate guard."),
		guardOpen:    d("hit_rate_guard_open", "1 while the hit-rate guard skips Redis reads."),
		guardTrips:   d("hit_rate_guard_trips_total", "Times the hit-rate guard tripped."),
		staleServed:  d("stale_served_total", "Stale values served in place of a failed or slow load."),
		refreshes:    d("refreshes_total", "Background loads started by early refresh or a soft timeout."),
		lockWaits:    d("lock_waits_total", "Loads another instance did for this one through the distributed lease."),
		loadTimeouts: d("load_timeouts_total", "Loads that reached LoadTimeout."),
	}
}

type collector struct {
	src interface{ Stats() Stats }

	hits, misses, loads, loadErrors, l2Errors, l1Evictions      *prometheus.Desc
	negativeHits, coalesced, l2Unreadable, encodeErrors         *prometheus.Desc
	l2Batched                                                   *prometheus.Desc
	l1Entries, l2Stale, superseded, l1Flushes                   *prometheus.Desc
	bus, busResubs, busErrors                                   *prometheus.Desc
	breakerOpen, breakerTrips, l2Skipped, guardOpen, guardTrips *prometheus.Desc
	staleServed, refreshes, lockWaits, loadTimeouts             *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.hits, c.misses, c.loads, c.loadErrors, c.l2Errors, c.l1Evictions,
		c.negativeHits, c.coalesced, c.l2Unreadable, c.encodeErrors, c.l2Batched, c.l1Entries,
		c.l2Stale, c.superseded, c.l1Flushes, c.bus, c.busResubs, c.busErrors,
		c.breakerOpen, c.breakerTrips, c.l2Skipped, c.guardOpen, c.guardTrips,
		c.staleServed, c.refreshes, c.lockWaits, c.loadTimeouts} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.src.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(c.hits, s.L1Hits, "l1")
	counter(c.hits, s.L2Hits, "l2")
	counter(c.misses, s.Misses)
	counter(c.loads, s.Loads)
	counter(c.loadErrors, s.LoadErrors)
	counter(c.l2Errors, s.L2Errors)
	counter(c.l1Evictions, s.L1Evictions)
	counter(c.negativeHits, s.NegativeHits)
	counter(c.coalesced, s.Coalesced)
	counter(c.l2Unreadable, s.L2Unreadable)
	counter(c.encodeErrors, s.EncodeErrors)
	counter(c.l2Batched, s.L2Batched)
	counter(c.l2Stale, s.L2Stale)
	counter(c.superseded, s.LoadsSuperseded)
	counter(c.l1Flushes, s.L1Flushes)
	counter(c.bus, s.BusSent, "sent")
	counter(c.bus, s.BusReceived, "received")
	counter(c.busResubs, s.BusResubscribes)
	counter(c.busErrors, s.BusErrors)
	counter(c.breakerTrips, s.BreakerTrips)
	counter(c.l2Skipped, s.L2Skipped)
	counter(c.guardTrips, s.HitRateGuardTrips)
	counter(c.staleServed, s.StaleServed)
	counter(c.refreshes, s.Refreshes)
	counter(c.lockWaits, s.LockWaits)
	counter(c.loadTimeouts, s.LoadTimeouts)
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	gauge(c.l1Entries, float64(s.L1Entries))
	gauge(c.breakerOpen, b2f(s.L2BreakerOpen))
	gauge(c.guardOpen, b2f(s.HitRateGuardOpen))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
