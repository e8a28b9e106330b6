package imgcache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every Cache is closed, every client
// too, and Close must have stopped whatever the cache started.
func TestMain(m *testing.M) {
	// go-redis logs every failed dial; the fault tests cause many on purpose.
	redis.SetLogger(quietLogger{})
	goleak.VerifyTestMain(m)
}

type quietLogger struct{}

func (quietLogger) Printf(context.Context, string, ...any) {}

// realRedisAddr is where the real-Redis suite runs; empty means miniredis only.
var realRedisAddr = os.Getenv("IMGCACHE_REDIS_ADDR")

// testEnv is one test's Redis: a fresh miniredis by default, or the real Redis at
// IMGCACHE_REDIS_ADDR under a namespace no other test uses.
type testEnv struct {
	t   testing.TB
	mr  *miniredis.Miniredis // nil against a real Redis
	rdb *redis.Client
	ns  string
}

// newEnv returns a test's Redis. Tests that need miniredis's fault hooks use newMiniEnv instead.
func newEnv(t testing.TB) *testEnv {
	t.Helper()
	if realRedisAddr == "" {
		return newMiniEnv(t)
	}
	rdb := redis.NewClient(&redis.Options{Addr: realRedisAddr, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		t.Fatalf("IMGCACHE_REDIS_ADDR=%s: %v", realRedisAddr, err)
	}
	return &testEnv{t: t, rdb: rdb, ns: uniqueNamespace(t)}
}

// newMiniEnv always uses miniredis, also in the real-Redis run.
func newMiniEnv(t testing.TB) *testEnv {
	t.Helper()
	mr := miniredis.RunT(t)
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr(), ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	return &testEnv{t: t, mr: mr, rdb: rdb, ns: uniqueNamespace(t)}
}

var unsafeNS = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

func uniqueNamespace(t testing.TB) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := unsafeNS.ReplaceAllString(t.Name(), "_")
	if len(name) > 60 {
		name = name[:60]
	}
	return "t_" + name + "_" + hex.EncodeToString(b[:])
}

// opts returns Options on this env's Redis and namespace; tweak the copy before New.
func (e *testEnv) opts() Options {
	return Options{Redis: e.rdb, Namespace: e.ns}
}

// newCache makes a Cache closed at the end of the test.
func newCache[V any](e *testEnv, o Options) *Cache[V] {
	e.t.Helper()
	c, err := New[V](o)
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return c
}

// redisKey is the full Redis key of k in this env's namespace.
func (e *testEnv) redisKey(k Key) string { return e.ns + ":" + k.String() }

// pttl returns the key's remaining TTL as Redis reports it.
func (e *testEnv) pttl(k Key) time.Duration {
	e.t.Helper()
	d, err := e.rdb.PTTL(context.Background(), e.redisKey(k)).Result()
	if err != nil {
		e.t.Fatalf("PTTL: %v", err)
	}
	return d
}

// raw reads the key's bytes straight from Redis ("" when absent).
func (e *testEnv) raw(k Key) string {
	e.t.Helper()
	s, err := e.rdb.Get(context.Background(), e.redisKey(k)).Result()
	if err != nil && err != redis.Nil {
		e.t.Fatalf("GET: %v", err)
	}
	return s
}

// advance moves Redis's clock: FastForward on miniredis, a real sleep on a real Redis.
func (e *testEnv) advance(d time.Duration) {
	if e.mr != nil {
		e.mr.FastForward(d)
		return
	}
	time.Sleep(d)
}

// namespaceKeys lists the env's data keys with SCAN, bookkeeping ("<ns>:%...") left out (tests only;
// the library never lists keys). allNamespaceKeys includes the bookkeeping.
func (e *testEnv) namespaceKeys() []string {
	e.t.Helper()
	var keys []string
	for _, k := range e.allNamespaceKeys() {
		if !strings.HasPrefix(k, e.ns+":%") {
			keys = append(keys, k)
		}
	}
	return keys
}

func (e *testEnv) allNamespaceKeys() []string {
	e.t.Helper()
	var keys []string
	iter := e.rdb.Scan(context.Background(), 0, e.ns+":*", 1000).Iterator()
	for iter.Next(context.Background()) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		e.t.Fatalf("SCAN: %v", err)
	}
	return keys
}
