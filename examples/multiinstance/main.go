// Command multiinstance runs three imgcache instances, A, B and C, on one Redis, as three replicas
// of a service would. It shows that a change made through A reaches the L1 of B and C through the
// invalidation bus within milliseconds, not after L1TTL (one minute here).
//
//	go run ./examples/multiinstance                           # starts an embedded miniredis
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/multiinstance # NAMESPACE sets the key prefix
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/imgcache/imgcache"
)

type cache = imgcache.Cache[imgcache.ImageMeta]

// deadline bounds every wait for B and C. The bus takes milliseconds; without it they would serve
// their L1 copies for L1TTL, and the run fails rather than hangs.
const deadline = 2 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	_, err := run(ctx, os.Getenv("REDIS_ADDR"), cmp.Or(os.Getenv("NAMESPACE"), "multiinstance"), os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "multiinstance:", err)
		os.Exit(1)
	}
}

// result is what a run observed, for main_test.go.
type result struct {
	Initial        [3]string       // the ETag that A, B and C served first
	Lags           []time.Duration // steps 2-5: from A's call until B and C both follow
	PatternRemoved int             // values InvalidatePattern removed from Redis
	Loads          int64           // database lookups
	Stats          [3]imgcache.Stats
}

// database stands in for the service's source of truth: artist avatars by id.
type database struct {
	mu    sync.Mutex
	rows  map[string]imgcache.ImageMeta
	loads atomic.Int64 // atomic: a load runs on in the cache after a cancelled caller returns
}

func (d *database) avatar(id string) func(context.Context) (imgcache.ImageMeta, error) {
	return func(context.Context) (imgcache.ImageMeta, error) {
		d.loads.Add(1)
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.rows[id], nil
	}
}

// update stores a new version of an avatar, as an upload would, and returns it.
func (d *database) update(id, etag string) imgcache.ImageMeta {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.rows[id]
	m.ETag, m.ModTime = etag, time.Now().UTC()
	d.rows[id] = m
	return m
}

func run(ctx context.Context, redisAddr, namespace string, out io.Writer) (*result, error) {
	if redisAddr == "" {
		mr, err := miniredis.Run()
		if err != nil {
			return nil, err
		}
		defer mr.Close() // deferred first, so it runs last: after every cache and client
		redisAddr = mr.Addr()
		fmt.Fprintf(out, "redis: embedded miniredis at %s (set REDIS_ADDR for a real one)\n", redisAddr)
	}
	// Each instance has a client of its own, as a separate process would. L1TTL keeps its default
	// of one minute: only the bus makes B and C notice A's changes sooner.
	var caches [3]*cache
	for i := range caches {
		rdb := redis.NewClient(&redis.Options{Addr: redisAddr, ContextTimeoutEnabled: true})
		defer rdb.Close()
		c, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: namespace})
		if err != nil {
			return nil, err
		}
		defer c.Close() // runs before rdb.Close: no cache outlives its client
		caches[i] = c
	}
	a, others := caches[0], caches[1:]
	db := &database{rows: map[string]imgcache.ImageMeta{}}
	for _, id := range []string{"1", "2", "3"} {
		db.rows[id] = imgcache.ImageMeta{Path: "artists/" + id + "/avatar.webp", Size: 48_213,
			MIMEType: "image/webp", Width: 512, Height: 512, ETag: `"v1"`, ModTime: time.Unix(1.7e9, 0).UTC()}
	}
	avatar := func(id string) imgcache.Key { return imgcache.NewKey("artist", id).With("type", "avatar") }
	res := &result{}
	var err error
	do := func(f func() error) { // runs f unless an earlier step failed
		if err == nil {
			err = f()
		}
	}
	// 1. Every instance reads artist 1's avatar.
	for i, c := range caches { // A loads it from the database; B and C find it in Redis
		do(func() error {
			m, err := c.GetOrLoad(ctx, avatar("1"), db.avatar("1"))
			res.Initial[i] = m.ETag
			return err
		})
	}
	fmt.Fprintf(out, "1. artist 1's avatar on A, B, C: %v (database loads: %d)\n", res.Initial, db.loads.Load())

	// step runs change on A, then polls B and C until check holds on both and prints how long that
	// took: polling, rather than sleeping for a guessed time, measures the propagation itself.
	step := func(what, outcome string, change func() error, check func(*cache) bool) {
		start := time.Now()
		do(change)
		do(func() error { return poll(ctx, what, func() bool { return check(others[0]) && check(others[1]) }) })
		if err == nil {
			res.Lags = append(res.Lags, time.Since(start))
			fmt.Fprintf(out, "%s: %s after %v\n", what, outcome, time.Since(start).Round(time.Microsecond))
		}
	}
	serves := func(etag string) func(*cache) bool {
		return func(c *cache) bool {
			m, err := c.GetOrLoad(ctx, avatar("1"), db.avatar("1"))
			return err == nil && m.ETag == etag
		}
	}
	gone := func(keys ...imgcache.Key) func(*cache) bool {
		return func(c *cache) bool {
			for _, k := range keys {
				if _, err := c.Get(ctx, k); !errors.Is(err, imgcache.ErrNotFound) {
					return false
				}
			}
			return true
		}
	}
	// allHeard reports whether B and C have applied every message A sent (only A sends any).
	allHeard := func() error {
		return poll(ctx, "bus", func() bool {
			return others[0].Stats().BusReceived == a.Stats().BusSent && others[1].Stats().BusReceived == a.Stats().BusSent
		})
	}

	// 2. A new upload written through A with Set: B and C drop their L1 copy and read Redis.
	step(`2. A.Set(ETag "v2")`, `B and C serve "v2"`,
		func() error { return a.Set(ctx, avatar("1"), db.update("1", `"v2"`)) }, serves(`"v2"`))
	// 3. An upload that only reached the database: InvalidateEntity removes every variant of
	// artist 1 from Redis and from every L1, and the next read loads the new row.
	step(`3. database "v3", A.InvalidateEntity("artist", "1")`, `B and C serve "v3"`,
		func() error { db.update("1", `"v3"`); return a.InvalidateEntity(ctx, "artist", "1") }, serves(`"v3"`))

	// 4. Tags cut across entities: the covers of two albums by artist 1 carry the tag "artist:1".
	// B and C read them once A's Sets have reached them, or a late message from a Set could drop
	// their copies and be mistaken for the tag invalidation's.
	covers := []imgcache.Key{imgcache.NewKey("album", "9").With("type", "cover"),
		imgcache.NewKey("album", "10").With("type", "cover")}
	for _, k := range covers {
		do(func() error { return a.Set(ctx, k, imgcache.ImageMeta{ETag: `"c1"`}, imgcache.WithTags("artist:1")) })
	}
	do(allHeard)
	for _, c := range others {
		for _, k := range covers {
			do(func() error { _, err := c.Get(ctx, k); return err }) // a Redis hit: now in L1
		}
	}
	step(`4. A.InvalidateTags("artist:1")`, "both album covers gone from B and C",
		func() error { return a.InvalidateTags(ctx, "artist:1") }, gone(covers...))

	// 5. A pattern walks Redis with SCAN: fine for a rare purge, too slow for routine invalidation.
	for _, id := range []string{"2", "3"} {
		for _, c := range caches {
			do(func() error { _, err := c.GetOrLoad(ctx, avatar(id), db.avatar(id)); return err })
		}
	}
	step(`5. A.InvalidatePattern("artist:*")`, "avatars 1-3 gone from B and C", func() (err error) {
		res.PatternRemoved, err = a.InvalidatePattern(ctx, "artist:*")
		return err
	}, gone(avatar("1"), avatar("2"), avatar("3")))
	do(allHeard) // then the counts below are final
	if err != nil {
		return nil, err
	}
	res.Loads = db.loads.Load()
	fmt.Fprintf(out, "   removed %d values from Redis\ndatabase loads: %d\n   BusSent BusReceived L1Hits L2Hits\n",
		res.PatternRemoved, res.Loads)
	for i, c := range caches {
		s := c.Stats()
		res.Stats[i] = s
		fmt.Fprintf(out, "%c  %7d %11d %6d %6d\n", 'A'+i, s.BusSent, s.BusReceived, s.L1Hits, s.L2Hits)
	}
	return res, nil
}

// poll calls cond until it holds, for at most deadline.
func poll(ctx context.Context, what string, cond func() bool) error {
	for end := time.Now().Add(deadline); !cond(); time.Sleep(100 * time.Microsecond) {
		if time.Now().After(end) || ctx.Err() != nil {
			return fmt.Errorf("%s: B and C did not follow within %v; is the bus working?", what, deadline)
		}
	}
	return nil
}
