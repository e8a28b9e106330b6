package imgcache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// valueWriteGate holds every call that writes a value (a SET of a data key, not a lease's) until
// gate is closed.
func valueWriteGate(gate <-chan struct{}) beforeCall {
	return func(_ context.Context, cmds []redis.Cmder) {
		for _, c := range cmds {
			if a := c.Args(); c.Name() == "set" && len(a) > 1 && !strings.Contains(fmt.Sprint(a[1]), ":%") {
				<-gate
				return
			}
		}
	}
}

// writeBehindEnv is a miniredis env whose value writes wait until open is called, and a cache on it
// with WriteBehind and a long L2Timeout. The test's end opens the gate before it closes the cache.
func writeBehindEnv(t *testing.T) (e *testEnv, c *Cache[ImageMeta], open func()) {
	t.Helper()
	gate := make(chan struct{})
	e = newMiniEnv(t)
	e.node().AddHook(valueWriteGate(gate))
	o := e.opts()
	o.WriteBehind = true
	o.L2Timeout = 5 * time.Second // a write held at the gate is slow, not failed
	c = newCache[ImageMeta](e, o)
	open = sync.OnceFunc(func() { close(gate) })
	t.Cleanup(open)
	return e, c, open
}

func constLoad(path string, calls *atomic.Int32) func(context.Context) (ImageMeta, error) {
	return func(context.Context) (ImageMeta, error) {
		calls.Add(1)
		return ImageMeta{Path: path}, nil
	}
}

// The caller gets the loaded value while its write waits; the write then lands, with its TTL.
func TestWriteBehindReturnsBeforeTheWrite(t *testing.T) {
	e, c, open := writeBehindEnv(t)
	k := NewKey("artist", "1").With("type", "avatar")
	var calls atomic.Int32
	got := make(chan error, 1)
	go func() {
		v, err := c.GetOrLoad(context.Background(), k, constLoad("/a.jpg", &calls), WithTTL(time.Minute))
		if err == nil && v.Path != "/a.jpg" {
			err = fmt.Errorf("got %+v", v)
		}
		got <- err
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		open()
		t.Fatal("GetOrLoad waited for its write to Redis")
	}
	if e.mr.Exists(e.redisKey(k)) {
		t.Fatal("the value is in Redis while its write is held")
	}
	if v, err := c.Get(context.Background(), k); err != nil || v.Path != "/a.jpg" {
		t.Fatalf("Get from L1 = %+v, %v", v, err)
	}
	open()
	eventuallyWithin(t, 2*time.Second, func() error {
		if !e.mr.Exists(e.redisKey(k)) {
			return errors.New("the value is not in Redis")
		}
		return nil
	})
	if ttl := e.pttl(k); ttl <= 0 || ttl > time.Minute {
		t.Errorf("the written value's TTL is %v; want up to 1m", ttl)
	}
	if n := calls.Load(); n != 1 {
		t.Errorf("%d loads; want 1", n)
	}
}

// Close sends every queued write before it returns, and stops the writer (goleak checks the rest).
func TestWriteBehindCloseSendsQueuedWrites(t *testing.T) {
	e, c, open := writeBehindEnv(t)
	var calls atomic.Int32
	keys := make([]Key, 20)
	for i := range keys {
		keys[i] = NewKey("album", fmt.Sprint(i))
		if _, err := c.GetOrLoad(context.Background(), keys[i], constLoad("/x.jpg", &calls)); err != nil {
			t.Fatal(err)
		}
	}
	// The writes are held past the time Close takes otherwise (the bus's stop, ~0.2 s here).
	const hold = 500 * time.Millisecond
	start := time.Now()
	time.AfterFunc(hold, open)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < hold {
		t.Errorf("Close returned after %v, before the queued writes could be sent (%v)", d, hold)
	}
	for _, k := range keys {
		if !e.mr.Exists(e.redisKey(k)) {
			t.Errorf("%v is not in Redis after Close", k)
		}
	}
	if _, err := c.GetOrLoad(context.Background(), keys[0], constLoad("/y.jpg", &calls)); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoad after Close = %v; want ErrClosed", err)
	}
}

// The load keeps its lease until its write lands: another instance that misses the key meanwhile
// waits for the value and does not load it.
func TestWriteBehindKeepsTheLeaseUntilTheWrite(t *testing.T) {
	e, a, open := writeBehindEnv(t)
	o := e.opts()
	o.Redis = heldClient(t, e, beforeCall(func(context.Context, []redis.Cmder) {}))
	b := newCache[ImageMeta](e, o)
	k := NewKey("artist", "7").With("type", "background")
	var aLoads, bLoads atomic.Int32
	if _, err := a.GetOrLoad(context.Background(), k, constLoad("/from-a.jpg", &aLoads)); err != nil {
		t.Fatal(err)
	}
	got := make(chan ImageMeta, 1)
	go func() {
		v, err := b.GetOrLoad(context.Background(), k, constLoad("/from-b.jpg", &bLoads))
		if err != nil {
			t.Error(err)
		}
		got <- v
	}()
	time.Sleep(150 * time.Millisecond)
	if n := bLoads.Load(); n != 0 {
		open()
		t.Fatalf("the other instance loaded the key while the first one's write was pending")
	}
	open()
	if v := <-got; v.Path != "/from-a.jpg" {
		t.Errorf("the other instance got %q; want the first one's value", v.Path)
	}
	if n := bLoads.Load(); n != 0 {
		t.Errorf("the other instance loaded %d times; want 0", n)
	}
}

// An invalidation that runs while the write waits makes the write be taken back: Redis does not
// keep the value it removed.
func TestWriteBehindWriteAfterInvalidateIsTakenBack(t *testing.T) {
	e, c, open := writeBehindEnv(t)
	k := NewKey("artist", "9").With("type", "avatar")
	var calls atomic.Int32
	if _, err := c.GetOrLoad(context.Background(), k, constLoad("/old.jpg", &calls)); err != nil {
		t.Fatal(err)
	}
	if err := c.InvalidateEntity(context.Background(), "artist", "9"); err != nil {
		t.Fatal(err)
	}
	open()
	if err := c.Close(); err != nil { // sends the write
		t.Fatal(err)
	}
	if e.mr.Exists(e.redisKey(k)) {
		t.Error("the value invalidated while its write waited is in Redis")
	}
	if lease := e.ns + ":%l:" + k.String(); e.mr.Exists(lease) {
		t.Errorf("the load's lease %s outlived its write", lease)
	}
	if n := c.Stats().LoadsSuperseded; n != 1 {
		t.Errorf("LoadsSuperseded = %d; want 1", n)
	}
}

// With the queue full, a load writes on its caller's path: the caller waits for Redis again.
func TestWriteBehindFullQueueWritesInline(t *testing.T) {
	_, c, open := writeBehindEnv(t)
	c.wb.mu.Lock()
	c.wb.max = 2
	c.wb.mu.Unlock()
	var calls atomic.Int32
	load := func(i int) <-chan error {
		done := make(chan error, 1)
		go func() {
			_, err := c.GetOrLoad(context.Background(), NewKey("album", fmt.Sprint(i)), constLoad("/x.jpg", &calls))
			done <- err
		}()
		return done
	}
	// The writer takes the first write and waits at the gate with it; two more fill the queue.
	for i := range 3 {
		if err := <-load(i); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			eventually(t, func() error { // the writer takes it
				c.wb.mu.Lock()
				defer c.wb.mu.Unlock()
				if n := len(c.wb.queue); n > 0 {
					return fmt.Errorf("%d writes queued", n)
				}
				return nil
			})
		}
	}
	inline := load(3)
	select {
	case err := <-inline:
		open()
		t.Fatalf("a load returned (%v) while the queue was full and Redis held its write", err)
	case <-time.After(150 * time.Millisecond):
	}
	open()
	if err := <-inline; err != nil {
		t.Fatal(err)
	}
}

// On every kind of Redis (miniredis, a real one, a Cluster, where the keys of one write batch live
// on several nodes and the leases are released after the writes): the queued writes land with
// their TTLs, and no lease outlives them.
func TestWriteBehindWritesLandOnEveryRedis(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.WriteBehind = true
	c := newCache[ImageMeta](e, o)
	ctx := context.Background()
	var calls atomic.Int32
	keys := make([]Key, 30)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i)).With("type", "avatar")
		if _, err := c.GetOrLoad(ctx, keys[i], constLoad(fmt.Sprintf("/%d.jpg", i), &calls), WithTTL(time.Minute), WithTags("t")); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if e.raw(k) == "" {
			t.Errorf("%v is not in Redis", k)
		} else if ttl := e.pttl(k); ttl <= 0 || ttl > time.Minute {
			t.Errorf("%v has TTL %v; want up to 1m", k, ttl)
		}
		if n := e.rdb.Exists(ctx, e.ns+":%l:"+k.String()).Val(); n != 0 {
			t.Errorf("the lease of %v outlived its write", k)
		}
	}
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("L2Errors = %d", n)
	}
}
