// Package imgcache is a two-level cache for the metadata an image service looks up on every request
// (file path, size, MIME type, dimensions, ETag, modification time), built for services that run
// as several instances.
//
// A [Cache] keeps values of one type V in two levels: L1, an in-process LRU (hashicorp/golang-lru/v2)
// on each instance, and L2, a Redis shared by all of them (redis/go-redis/v9: a single node, Sentinel
// or Cluster). Keys are built only by [NewKey] and [Key.With], which normalise what callers spell
// differently, so a writer and a reader cannot disagree on a key.
//
//	c, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: "img"})
//	...
//	meta, err := c.GetOrLoad(ctx, imgcache.NewKey("artist", id).With("type", "avatar"),
//		func(ctx context.Context) (imgcache.ImageMeta, error) { return db.AvatarMeta(ctx, id) })
//
// # The read path
//
// [Cache.GetOrLoad] looks in L1; on a miss it joins the load already in flight for the key on this
// instance or starts one. The flight looks in L1 again (an earlier flight may have just filled it),
// then in Redis, and only then calls the loader. A Redis hit fills L1; a loaded value is stored in
// both levels, each with its TTL: L1 for the shorter of Options.L1TTL and the value's TTL, Redis for
// the value's TTL, written in the same command as the value (SET key value PX ms). [Cache.Get] is
// the same without the loader and without the flight. [Cache.GetMany] and [Cache.GetOrLoadMany]
// do the same for many keys at once: one Redis round trip for all of L1's misses, and one loader
// call for the keys that neither level has and no flight is already loading.
//
// A loader that returns an error wrapping [ErrNotFound] makes the cache remember the absence for
// Options.NegativeTTL in both levels, so a missing image does not send every request, on every
// instance, to the database. Other loader errors are returned and never cached.
//
// # Invalidation and how stale a value can be
//
// [Cache.Set], [Cache.Delete], [Cache.InvalidateEntity], [Cache.InvalidateTags] and
// [Cache.InvalidatePattern] change Redis and then publish a message on the namespace's pub/sub
// channel; every other instance drops the affected L1 entries when it arrives (a millisecond or two
// on a LAN). Pub/sub loses messages while a subscriber is disconnected, so an instance empties its
// L1 whenever its subscription is re-established; while it is disconnected its L1 keeps serving,
// each entry for at most Options.L1TTL (and never past the value's Redis TTL). That is the
// staleness bound during a disconnection.
//
// A load or an L2 read that is in flight when an invalidation happens may return its result to its
// callers, but its result does not stay cached as fresh, in L1 or in Redis, on any instance: values
// are stamped with the generations they were loaded under (an entity or tag invalidation makes them
// read as stale at once), and loads verify after writing and take back a write that a Delete, Set
// or pattern invalidation overtook, within a round trip or two, telling the other instances to drop
// any copy they read in between (see invalidate.go).
//
// To check a stamp, a read from Redis needs the current generations. Each instance trusts those it
// has read (with a value, or while registering one) for Options.GenerationTTL, L1TTL by default,
// and then reads a value alone: one GET. The trust follows invalidations as L1 does: an invalidation
// forgets it at once on its own instance and through the bus on the others, and a resubscription
// forgets it all; so the staleness bound is L1's. A stamp that differs from a trusted generation is
// read again with the generation key, so a missed message never turns a valid value into a miss.
// With GenerationTTL negative every read checks the generations in Redis.
//
// An invalidation that fails may still have changed Redis (a reply lost after its script ran), so
// it forgets locally again and queues its message; the bus goroutine publishes it once Redis
// answers, so that the other instances drop and forget what it may have made stale. A message that
// could not be published after an invalidation succeeded is queued the same way.
//
// Expiry is checked on read against a clock that one goroutine per process advances every
// millisecond; nothing runs per entry.
//
// # Failures
//
// Every Redis call has its own deadline, Options.L2Timeout (100 ms by default), whatever the
// caller's context allows; this needs a go-redis client with ContextTimeoutEnabled, and New refuses
// one without it. The deadline bounds the socket, the dial and go-redis's waits for a pooled
// connection and between retries; it is a value, not a timer per call. A caller's earlier deadline
// ends the call sooner; a caller's cancellation is checked before the call and after it, not during
// a wait (which ends by L2Timeout anyway). A Redis that is down, slow or erroring never fails a read that L1 or the loader can
// answer: Get and GetOrLoad treat its errors as misses and count them in [Stats].L2Errors. A value
// in Redis that does not decode (another codec, another format version, corruption, larger than
// Options.MaxValueSize) is a miss, is deleted from Redis, and is counted in Stats.L2Unreadable. Set
// and Delete return Redis errors, wrapped as "imgcache: <op> <key>: ...", after doing their L1 part.
//
// # Errors
//
// [ErrNotFound] is a miss; [ErrClosed] follows [Cache.Close]. A Key built from bad input (an empty
// entity or id, a control character, a key longer than [MaxKeyLen]) makes every method return an
// error saying what was wrong; [Key.Err] reports it early. Nothing panics on bad input, and a
// panicking loader becomes an error for its callers.
//
// # Concurrency and Close
//
// A Cache is safe for concurrent use. Concurrent GetOrLoad calls for one key share one load, which
// runs detached from any single caller's cancellation (in a goroutine of its own when the first
// caller's context can end): a caller whose context ends while it waits for the load returns at
// once with the context's error, and the load goes on for the others. The read of Redis before a
// load runs in the first caller's goroutine unless its context's deadline is near, and serves every
// caller: a caller cancelled during it returns when it ends (each Redis call is bounded by
// Options.L2Timeout).
// Concurrent reads of a single Redis share round trips: up to four go to Redis as they come, and
// the reads that arrive while four are under way wait for one of them to end and then go together,
// as one MGET. A queued read still gives up at its caller's deadline or cancellation, or L2Timeout
// after it queued. Reads sent in a batch of more than one are counted in [Stats].L2Batched. A
// Cluster's or a Ring's reads are not batched. The reads of a single Redis go on up to four
// connections the cache holds out of the client's pool (see [Options].ReadConns), which skips the
// pool's check of a connection on every command; a read that a dead held connection fails is made
// again through the pool.
//
// [Cache.Close] cancels running loads' contexts, waits for them, stops the bus goroutine and its
// subscription, gives the held read connections back to the client's pool, and stops the clock
// goroutine when the last Cache of the process closes; it is idempotent, and it does not close the
// Redis client. Nothing else runs in the background.
//
// # Stats and logging
//
// [Cache.Stats] returns exact counters (hits per level, misses, loads, errors, evictions) and
// [Stats.HitRate]; [NewCollector] exports them to Prometheus, reading one snapshot per scrape.
// With an Options.Logger at Debug level, every Redis GET and SET is logged with its key and HIT,
// MISS or ERROR: the record that diagnoses a hit rate stuck at zero. Values are never logged.
package imgcache
