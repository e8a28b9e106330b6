package imgcache

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// On a Cluster or a Ring one pipeline goes to several nodes, and one node can fail its part while
// the others answer theirs. go-redis then returns the first failed command's error for the whole
// pipeline; every command still has its own reply. These tests fail one node's commands (with the
// faults hook) and check that the keys on the other nodes keep what they earned.

// faults is a hook that answers chosen commands (alone or in a pipeline) as a failing node would.
type faults struct {
	mu    sync.Mutex
	rules []*fault
}

// fault matches the commands name whose first key is key. The n-th match gets plan[n]: nil sends
// it as usual; a lost error sends it and fails it with its error once answered, as a reply lost to
// a timeout; any other error fails it unsent, as a node that is down (a net error) or refuses it
// (a reply error) would. Matches past the plan are sent as usual. seen counts the matches.
type fault struct {
	name, key string
	plan      []error
	seen      int
}

func (f *faults) add(name, key string, plan ...error) *fault {
	r := &fault{name: name, key: key, plan: plan}
	f.mu.Lock()
	f.rules = append(f.rules, r)
	f.mu.Unlock()
	return r
}

// seen returns how many commands r has matched so far.
func (f *faults) seen(r *fault) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return r.seen
}

// failure returns the error cmd is to fail with, or nil to send it.
func (f *faults) failure(cmd redis.Cmder) error {
	args := cmd.Args()
	if len(args) < 2 {
		return nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range f.rules {
		if cmd.Name() != r.name || args[1] != any(r.key) {
			continue
		}
		n := r.seen
		r.seen++
		if n < len(r.plan) {
			return r.plan[n]
		}
	}
	return nil
}

func (*faults) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f *faults) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := f.failure(cmd)
		var l lost
		if err == nil || errors.As(err, &l) {
			if nerr := next(ctx, cmd); err == nil {
				return nerr
			}
			err = l.err
		}
		cmd.SetErr(err)
		return err
	}
}

func (f *faults) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		send := make([]redis.Cmder, 0, len(cmds))
		var failed []redis.Cmder
		var errs []error
		for _, cmd := range cmds {
			err := f.failure(cmd)
			var l lost
			if err == nil || errors.As(err, &l) {
				send = append(send, cmd)
			}
			if err != nil {
				failed, errs = append(failed, cmd), append(errs, err)
			}
		}
		var err error
		if len(send) > 0 {
			err = next(ctx, send)
		}
		for x, cmd := range failed {
			var l lost
			if errors.As(errs[x], &l) {
				errs[x] = l.err
			}
			cmd.SetErr(errs[x])
		}
		// As go-redis does: the pipeline's error is its first failed command's.
		for _, cmd := range cmds {
			if cerr := cmd.Err(); cerr != nil {
				return cerr
			}
		}
		return err
	}
}

// lost is a fault whose command is sent and runs, and whose reply is lost: it fails with err.
type lost struct{ err error }

func (l lost) Error() string { return "lost reply: " + l.err.Error() }

// refusal is an error reply from Redis, as a node out of memory sends for a write.
type refusal string

func (r refusal) Error() string { return string(r) }
func (refusal) RedisError()     {}

// nodeDown is the error of a command sent to a node that is down.
var nodeDown = errors.New("dial tcp 127.0.0.1:7102: connect: connection refused")

// waitSetup is a batch cache b, on a client with the faults hook f, about to wait for two keys
// whose leases another holder has taken; holder is that holder's cache, on a healthy client.
type waitSetup struct {
	e         *testEnv
	ks        []Key
	f         *faults
	b, holder *Cache[ImageMeta]
}

func newWaitSetup(t *testing.T, path string, env func(testing.TB) *testEnv, client func(*testing.T, *testEnv, redis.Hook) redis.UniversalClient) *waitSetup {
	w := &waitSetup{e: env(t), ks: coverKeys(path, 2), f: &faults{}}
	opts := w.e.opts()
	opts.Redis = client(t, w.e, w.f)
	opts.BreakerThreshold = -1
	w.b = newCache[ImageMeta](w.e, opts)
	w.holder = newCache[ImageMeta](w.e, w.e.opts())
	for _, k := range w.ks {
		if err := w.e.rdb.Set(ctx, w.b.leaseKey(k), "holder-"+k.ID(), time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// startBatch starts w.b.GetOrLoadMany of w.ks with loader l in a goroutine and returns once it
// has polled the leases (it waits for them); wait returns what GetOrLoadMany did.
func (w *waitSetup) startBatch(t *testing.T, l *countingBatchLoader) (wait func() ([]bool, error)) {
	polls := w.f.add("get", w.b.leaseKey(w.ks[1]))
	var found []bool
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, found, err = w.b.GetOrLoadMany(ctx, w.ks, l.load)
	}()
	eventually(t, func() error {
		if w.f.seen(polls) == 0 {
			return errors.New("the batch has not polled the leases yet")
		}
		return nil
	})
	return func() ([]bool, error) { <-done; return found, err }
}

// release is the holder's finish for ks[i]: it stores the key's value and lets the lease go.
func (w *waitSetup) release(ctx context.Context, i int) error {
	if err := w.holder.Set(ctx, w.ks[i], metaV(w.ks[i].String(), 1)); err != nil {
		return err
	}
	return w.e.rdb.Del(ctx, w.b.leaseKey(w.ks[i])).Err()
}

// A batch load whose write of one value is refused (its node is out of memory) keeps the values
// written to the other nodes: their writes are checked, and nothing moved, so none is taken back.
func TestBatchWriteRefusedOnOneNodeKeepsTheOthers(t *testing.T) {
	for _, path := range writePaths {
		t.Run(path.name, func(t *testing.T) {
			e := path.env(t)
			ks := coverKeys("refused", 2)
			f := &faults{}
			opts := e.opts()
			opts.Redis = path.client(t, e, f)
			opts.BreakerThreshold = -1
			c := newCache[ImageMeta](e, opts)
			refused := f.add("set", c.l2.key(ks[0]), refusal("OOM command not allowed when used memory > 'maxmemory'"))
			var l countingBatchLoader
			vals, found, err := c.GetOrLoadMany(ctx, ks, l.load)
			if err != nil || !found[0] || !found[1] {
				t.Fatalf("GetOrLoadMany = %v, %v; want both values", found, err)
			}
			if f.seen(refused) != 1 {
				t.Fatalf("the write of %v was matched %d times, want 1", ks[0], f.seen(refused))
			}
			for i, k := range ks {
				if want := metaV(k.String(), 1).ETag; vals[i].ETag != want {
					t.Errorf("value %d: ETag %s, want %s", i, vals[i].ETag, want)
				}
			}
			if n := e.rdb.Exists(ctx, c.l2.key(ks[1])).Val(); n != 1 {
				t.Errorf("the value written to the healthy node was taken back")
			}
			if n := e.rdb.Exists(ctx, c.l2.key(ks[0])).Val(); n != 0 {
				t.Errorf("the refused write is in Redis")
			}
			if st := c.Stats(); st.LoadsSuperseded != 0 {
				t.Errorf("LoadsSuperseded = %d with nothing invalidated", st.LoadsSuperseded)
			}
		})
	}
}

// A batch waiting for other holders' leases reads the values they stored in one round trip once
// the leases have gone. If one node fails its part of that read, the keys read from the other
// nodes take their values: only the key whose read failed is loaded here.
func TestWaitReadFailingOnOneNodeStillTakesTheOtherValues(t *testing.T) {
	for _, path := range writePaths {
		t.Run(path.name, func(t *testing.T) {
			w := newWaitSetup(t, "waitread", path.env, path.client)
			ks, f := w.ks, w.f
			var l countingBatchLoader
			wait := w.startBatch(t, &l)
			// The value of ks[0] is read again once the leases have gone: its node fails then.
			failing := f.add("get", w.b.l2.key(ks[0]), nodeDown)
			for i := range ks {
				if err := w.release(ctx, i); err != nil {
					t.Fatal(err)
				}
			}
			found, err := wait()
			if err != nil || !found[0] || !found[1] {
				t.Fatalf("GetOrLoadMany = %v, %v; want both values", found, err)
			}
			if f.seen(failing) == 0 {
				t.Fatalf("the value of %v was never read after the leases had gone", ks[0])
			}
			if calls := l.callsOf(); !slices.EqualFunc(calls, [][]Key{{ks[0]}}, slices.Equal) {
				t.Errorf("loader calls %v; want one, of the key whose read failed", calls)
			}
		})
	}
}

// A batch waiting for two holders' leases polls both in one round trip. If the poll of one fails
// (its node is down), that key is loaded here; the other holder is alive and is waited for, and
// its value is taken, not loaded a second time.
func TestLeasePollFailingOnOneNodeKeepsWaitingForTheOthers(t *testing.T) {
	for _, path := range writePaths {
		t.Run(path.name, func(t *testing.T) {
			w := newWaitSetup(t, "pollfail", path.env, path.client)
			ks, f := w.ks, w.f
			failing := f.add("get", w.b.leaseKey(ks[0]), nodeDown)
			// ks[1]'s holder finishes while the batch loads ks[0].
			load := func(ctx context.Context, got []Key) (map[Key]ImageMeta, error) {
				if slices.Contains(got, ks[0]) {
					if err := w.release(ctx, 1); err != nil {
						return nil, err
					}
				}
				m := map[Key]ImageMeta{}
				for _, k := range got {
					m[k] = metaV(k.String(), 2)
				}
				return m, nil
			}
			var mu sync.Mutex
			var calls [][]Key
			vals, found, err := w.b.GetOrLoadMany(ctx, ks, func(ctx context.Context, got []Key) (map[Key]ImageMeta, error) {
				mu.Lock()
				calls = append(calls, slices.Clone(got))
				mu.Unlock()
				return load(ctx, got)
			})
			if err != nil || !found[0] || !found[1] {
				t.Fatalf("GetOrLoadMany = %v, %v; want both values", found, err)
			}
			if f.seen(failing) == 0 {
				t.Fatal("the lease of the failing key was never polled")
			}
			if !slices.EqualFunc(calls, [][]Key{{ks[0]}}, slices.Equal) {
				t.Errorf("loader calls %v; want one, of the key whose poll failed", calls)
			}
			if want := metaV(ks[1].String(), 1).ETag; vals[1].ETag != want {
				t.Errorf("the waited-for key has ETag %s, want its holder's %s", vals[1].ETag, want)
			}
		})
	}
}

// A value that looks stale on a Cluster or a Ring is looked at again (staleOnSecondLook). If that
// second read fails, the value may well be current: the read is a miss, and the value stays in
// Redis for the next reader.
func TestFailedSecondLookDoesNotDeleteTheValue(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "lookfails")
	a := newCache[ImageMeta](e, e.opts())
	if err := a.Set(ctx, k, metaV("lookfails", 1)); err != nil {
		t.Fatal(err)
	}
	rkey, genKey := a.l2.readKeys(k)
	// The first read of the generation finds it absent (read before the value was written); the
	// second look's read of it fails.
	hold := &absentOnce{key: genKey}
	f := &faults{}
	failing := f.add("get", genKey, nil, nodeDown)
	bo := e.opts()
	bo.Redis = heldRing(t, e, hold)
	bo.Redis.(*redis.Ring).AddHook(f)
	bo.BreakerThreshold = -1
	b := newCache[ImageMeta](e, bo)
	if v, err := b.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get = %s, %v; want a miss while the value cannot be checked", v.ETag, err)
	}
	if !hold.done.Load() || f.seen(failing) != 2 {
		t.Fatalf("the generation was read %d times (first absent: %v); want the read, then the failed look", f.seen(failing), hold.done.Load())
	}
	if n := e.rdb.Exists(ctx, rkey).Val(); n != 1 {
		t.Error("a value that could not be checked was deleted from Redis")
	}
	st := b.Stats()
	if st.L2Stale != 0 || st.L2Errors == 0 {
		t.Errorf("L2Stale = %d, L2Errors = %d; want no stale value and the failed read counted", st.L2Stale, st.L2Errors)
	}
	if v, err := b.Get(ctx, k); err != nil || v.ETag != `"lookfails-v1"` {
		t.Errorf("Get once Redis answers = %s, %v; want the stored value", v.ETag, err)
	}
}

// On a Cluster or a Ring a write that timed out is not followed by its check: Redis is slow, the
// check would likely wait as long, and the write is taken back whatever it says. Only the
// take-back's round trip follows, so the load's Redis part stays within two L2Timeouts.
func TestTimedOutWriteIsTakenBackUnchecked(t *testing.T) {
	e := newNodeEnv(t)
	k := coverKeys("timedout", 1)[0]
	f := &faults{}
	opts := e.opts()
	opts.Redis = heldRing(t, e, f)
	opts.BreakerThreshold = -1
	c := newCache[ImageMeta](e, opts)
	write := f.add("set", c.l2.key(k), lost{context.DeadlineExceeded})
	check := f.add("hget", c.l2.entityMetaOf(k))
	loads := 0
	v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
		loads++
		return metaV(k.String(), 1), nil
	})
	if err != nil || v.ETag != metaV(k.String(), 1).ETag || loads != 1 {
		t.Fatalf("GetOrLoad = %s, %v after %d loads; want the loaded value", v.ETag, err, loads)
	}
	if f.seen(write) != 1 {
		t.Fatalf("the value was written %d times, want once", f.seen(write))
	}
	if n := f.seen(check); n != 0 {
		t.Errorf("the timed-out write was checked (%d reads of its entity's meta hash)", n)
	}
	if n := e.rdb.Exists(ctx, c.l2.key(k)).Val(); n != 0 {
		t.Error("the timed-out write, which landed, is still in Redis")
	}
}
