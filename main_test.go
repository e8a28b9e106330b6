package imgcache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"regexp"
	"strings"
	"sync"
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

// clusterAddrs are the seed nodes of the Redis Cluster the cluster suite runs on
// (IMGCACHE_REDIS_CLUSTER_ADDRS, comma-separated; scripts/redis-cluster.sh starts one); empty
// means no cluster run.
var clusterAddrs = strings.FieldsFunc(os.Getenv("IMGCACHE_REDIS_CLUSTER_ADDRS"), func(r rune) bool { return r == ',' })

// testEnv is one test's Redis: a fresh miniredis by default, the real Redis at IMGCACHE_REDIS_ADDR,
// or the Redis Cluster at IMGCACHE_REDIS_CLUSTER_ADDRS, under a namespace no other test uses.
type testEnv struct {
	t   testing.TB
	mr  *miniredis.Miniredis  // nil against a real Redis
	rdb redis.UniversalClient // a *redis.Client, or a *redis.ClusterClient in the cluster run
	ns  string
}

// newEnv returns a test's Redis: the cluster when IMGCACHE_REDIS_CLUSTER_ADDRS is set, else as
// newNodeEnv. Tests that need miniredis's fault hooks use newMiniEnv instead, and tests that need
// one node (a hook on its client, CLIENT LIST, CONFIG SET, a proxy to its address) newNodeEnv.
func newEnv(t testing.TB) *testEnv {
	t.Helper()
	if len(clusterAddrs) > 0 {
		return newClusterEnv(t)
	}
	return newNodeEnv(t)
}

// newClusterEnv returns an env on the Redis Cluster at IMGCACHE_REDIS_CLUSTER_ADDRS, and skips the
// test without it.
func newClusterEnv(t testing.TB) *testEnv {
	t.Helper()
	if len(clusterAddrs) == 0 {
		t.Skip("IMGCACHE_REDIS_CLUSTER_ADDRS is not set (scripts/redis-cluster.sh start prints it)")
	}
	rdb := redis.NewClusterClient(&redis.ClusterOptions{Addrs: clusterAddrs, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return c.Ping(ctx).Err() }); err != nil {
		t.Fatalf("IMGCACHE_REDIS_CLUSTER_ADDRS=%s: %v", strings.Join(clusterAddrs, ","), err)
	}
	return &testEnv{t: t, rdb: rdb, ns: uniqueNamespace(t)}
}

// newNodeEnv returns a single node: the real Redis at IMGCACHE_REDIS_ADDR, else miniredis.
func newNodeEnv(t testing.TB) *testEnv {
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

// node returns the env's client as a single node's, for a test that made its env with newNodeEnv
// or newMiniEnv.
func (e *testEnv) node() *redis.Client {
	e.t.Helper()
	c, ok := e.rdb.(*redis.Client)
	if !ok {
		e.t.Fatalf("the env's client is a %T: this test needs newNodeEnv", e.rdb)
	}
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
	var (
		mu   sync.Mutex
		keys []string
	)
	scan := func(ctx context.Context, node *redis.Client) error {
		iter := node.Scan(ctx, 0, e.ns+":*", 1000).Iterator()
		for iter.Next(ctx) {
			mu.Lock()
			keys = append(keys, iter.Val())
			mu.Unlock()
		}
		return iter.Err()
	}
	var err error
	if c, ok := e.rdb.(*redis.ClusterClient); ok {
		err = c.ForEachMaster(context.Background(), scan) // a SCAN sees one node's keys
	} else {
		err = scan(context.Background(), e.node())
	}
	if err != nil {
		e.t.Fatalf("SCAN: %v", err)
	}
	return keys
}
