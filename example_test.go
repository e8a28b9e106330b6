package imgcache_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/imgcache/imgcache"
)

// lookupAvatar stands for the service's existing lookup: a database query and a stat of the file.
func lookupAvatar(_ context.Context, artistID string) (imgcache.ImageMeta, error) {
	if artistID == "404" {
		return imgcache.ImageMeta{}, fmt.Errorf("artist %s: %w", artistID, imgcache.ErrNotFound)
	}
	return imgcache.ImageMeta{
		Path:     "/srv/images/artists/" + artistID + "/avatar.webp",
		Size:     48213,
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     `"a1b2c3"`,
		ModTime:  time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC),
	}, nil
}

// Wrap an existing image lookup with GetOrLoad: the first request loads, the rest are hits, on this
// instance and on every other instance that shares the Redis.
func Example() {
	mr, _ := miniredis.Run() // a real service passes its own Redis address
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()

	avatars, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: "img"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer avatars.Close()

	ctx := context.Background()
	for range 3 {
		id := "123"
		meta, err := avatars.GetOrLoad(ctx, imgcache.NewKey("artist", id).With("type", "avatar"),
			func(ctx context.Context) (imgcache.ImageMeta, error) { return lookupAvatar(ctx, id) })
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println(meta.Path, meta.MIMEType, meta.ETag)
	}
	s := avatars.Stats()
	fmt.Printf("loads=%d l1 hits=%d hit rate=%.2f\n", s.Loads, s.L1Hits, s.HitRate())
	// Output:
	// /srv/images/artists/123/avatar.webp image/webp "a1b2c3"
	// /srv/images/artists/123/avatar.webp image/webp "a1b2c3"
	// /srv/images/artists/123/avatar.webp image/webp "a1b2c3"
	// loads=1 l1 hits=2 hit rate=0.67
}

// Keys are normalised: parameter names ignore case and separators, parameter order does not
// matter, and the entity ignores case. The id is kept as given.
func ExampleNewKey() {
	a := imgcache.NewKey("Artist", "123").With("userID", "7").With("size", "256")
	b := imgcache.NewKey("artist ", "123").With("size", " 256").With("user_id", "7")
	fmt.Println(a == b)
	fmt.Println(a.String())
	fmt.Println(imgcache.NewKey("artist", "a:b*").String()) // escaped: no collision, no glob
	fmt.Println(imgcache.NewKey("", "1").Err())
	// Output:
	// true
	// artist:123:feed9cf7cdc5418d
	// artist:a%3Ab%2A:ef46db3751d8e999
	// imgcache: invalid key: empty entity
}

// A loader's ErrNotFound is remembered for Options.NegativeTTL: a missing image is looked up once,
// not on every request.
func ExampleCache_GetOrLoad_notFound() {
	c, _ := imgcache.New[imgcache.ImageMeta](imgcache.Options{NegativeTTL: time.Minute})
	defer c.Close()
	ctx := context.Background()
	loads := 0
	for range 3 {
		_, err := c.GetOrLoad(ctx, imgcache.NewKey("artist", "404"), func(ctx context.Context) (imgcache.ImageMeta, error) {
			loads++
			return lookupAvatar(ctx, "404")
		})
		fmt.Println(errors.Is(err, imgcache.ErrNotFound))
	}
	fmt.Println("loads:", loads)
	// Output:
	// true
	// true
	// true
	// loads: 1
}

// Load a page of album covers with one query for whatever the cache lacks: the second view of the
// page costs no query, and an album the query did not find is remembered as not found.
func ExampleCache_GetOrLoadMany() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	covers, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: "img"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer covers.Close()

	// coversByID stands for one database query for many albums (WHERE id IN (...)).
	coversByID := func(_ context.Context, ks []imgcache.Key) (map[imgcache.Key]imgcache.ImageMeta, error) {
		ids := make([]string, len(ks))
		found := make(map[imgcache.Key]imgcache.ImageMeta)
		for i, k := range ks {
			ids[i] = k.ID()
			if k.ID() != "404" {
				found[k] = imgcache.ImageMeta{Path: "/srv/images/albums/" + k.ID() + "/cover.webp", MIMEType: "image/webp"}
			}
		}
		fmt.Println("query:", strings.Join(ids, ","))
		return found, nil
	}
	var page []imgcache.Key
	for _, id := range []string{"7", "8", "404", "9"} {
		page = append(page, imgcache.NewKey("album", id).With("type", "cover"))
	}
	ctx := context.Background()
	for range 2 {
		vals, found, err := covers.GetOrLoadMany(ctx, page, coversByID)
		if err != nil {
			fmt.Println(err)
			return
		}
		for i, k := range page {
			if found[i] {
				fmt.Println(k.ID(), vals[i].Path)
			} else {
				fmt.Println(k.ID(), "not found")
			}
		}
	}
	s := covers.Stats()
	fmt.Printf("loads=%d misses=%d l1 hits=%d\n", s.Loads, s.Misses, s.L1Hits)
	// Output:
	// query: 7,8,404,9
	// 7 /srv/images/albums/7/cover.webp
	// 8 /srv/images/albums/8/cover.webp
	// 404 not found
	// 9 /srv/images/albums/9/cover.webp
	// 7 /srv/images/albums/7/cover.webp
	// 8 /srv/images/albums/8/cover.webp
	// 404 not found
	// 9 /srv/images/albums/9/cover.webp
	// loads=1 misses=4 l1 hits=4
}

// Per-call TTLs are time.Durations: 1500*time.Millisecond is 1.5 s in Redis, never 1500 s.
func ExampleWithTTL() {
	mr, _ := miniredis.Run()
	defer mr.Close()
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	c, _ := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: "img"})
	defer c.Close()

	k := imgcache.NewKey("album", "9").With("type", "cover")
	meta, _ := lookupAvatar(context.Background(), "9")
	_ = c.Set(context.Background(), k, meta, imgcache.WithTTL(1500*time.Millisecond))
	fmt.Println(mr.TTL("img:" + k.String()))
	fmt.Println(c.Set(context.Background(), k, meta, imgcache.WithTTL(time.Microsecond)))
	// Output:
	// 1.5s
	// imgcache: set album:9:a52027fe085b5137: TTL 1µs is under 1ms
}

// Export the counters to Prometheus with a cache=<name> label.
func ExampleNewCollector() {
	c, _ := imgcache.New[imgcache.ImageMeta](imgcache.Options{})
	defer c.Close()
	ctx := context.Background()
	k := imgcache.NewKey("artist", "1")
	_, _ = c.Get(ctx, k) // a miss
	meta, _ := lookupAvatar(ctx, "1")
	_ = c.Set(ctx, k, meta)
	_, _ = c.Get(ctx, k) // an L1 hit

	reg := prometheus.NewRegistry()
	reg.MustRegister(imgcache.NewCollector("avatars", c))
	err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP imgcache_hits_total Lookups answered by a cache level.
# TYPE imgcache_hits_total counter
imgcache_hits_total{cache="avatars",level="l1"} 1
imgcache_hits_total{cache="avatars",level="l2"} 0
# HELP imgcache_misses_total Lookups that neither level could answer.
# TYPE imgcache_misses_total counter
imgcache_misses_total{cache="avatars"} 1
`), "imgcache_hits_total", "imgcache_misses_total")
	fmt.Println(err)
	// Output:
	// <nil>
}
