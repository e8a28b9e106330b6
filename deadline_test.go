package imgcache

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

type ctxKey struct{}

func TestCallCtxEndsAtItsDeadline(t *testing.T) {
	acquireClock()
	defer releaseClock()

	parent := context.WithValue(context.Background(), ctxKey{}, "v")
	deadline := preciseNow() + int64(30*time.Millisecond)
	ctx := newCallCtx(parent, deadline)
	if ctx == nil {
		t.Fatal("newCallCtx returned nil while the clock runs")
	}
	if got := ctx.Value(ctxKey{}); got != "v" {
		t.Errorf("Value = %v, want the parent's %q", got, "v")
	}
	dl, ok := ctx.Deadline()
	if want := clockEpoch.Add(time.Duration(deadline)); !ok || !dl.Equal(want) {
		t.Errorf("Deadline() = %v, %v; want %v, true", dl, ok, want)
	}
	if err := ctx.Err(); err != nil {
		t.Errorf("Err() before the deadline = %v, want nil", err)
	}
	select {
	case <-ctx.Done():
		t.Fatal("Done closed before the deadline")
	default:
	}
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done still open 5s after a 30ms deadline")
	}
	if now := preciseNow(); now < deadline {
		t.Errorf("Done closed %v before the deadline", time.Duration(deadline-now))
	}
	if err := ctx.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Err() after the deadline = %v, want context.DeadlineExceeded", err)
	}
}

func TestCallCtxSharesOneChannelPerTick(t *testing.T) {
	acquireClock()
	defer releaseClock()

	at := (preciseNow()/int64(clockTick) + 1000) * int64(clockTick) // a tick boundary, 1s away
	a := newCallCtx(context.Background(), at-int64(clockTick)+1)
	b := newCallCtx(context.Background(), at)
	c := newCallCtx(context.Background(), at+1)
	if a.Done() != b.Done() {
		t.Error("two deadlines in one tick got different Done channels")
	}
	if b.Done() == c.Done() {
		t.Error("deadlines in different ticks share a Done channel")
	}
}

func TestCallCtxNeedsTheClock(t *testing.T) {
	clockMu.Lock()
	refs := clockRefs
	clockMu.Unlock()
	if refs != 0 {
		t.Skipf("%d caches of other tests are open; the clock runs", refs)
	}
	if ctx := newCallCtx(context.Background(), preciseNow()+int64(time.Second)); ctx != nil {
		t.Fatal("newCallCtx returned a context that no clock goroutine would end")
	}
}

// TestCallCtxConcurrentWithClockRestarts runs calls while the clock stops and starts, for the race
// detector: every context handed out must be closed once a clock runs past its deadline.
func TestCallCtxConcurrentWithClockRestarts(t *testing.T) {
	acquireClock()
	defer releaseClock()
	var wg sync.WaitGroup
	ctxs := make(chan context.Context, 4000)
	for range 4 {
		wg.Go(func() {
			for range 1000 {
				if ctx := newCallCtx(context.Background(), preciseNow()+int64(5*time.Millisecond)); ctx != nil {
					ctxs <- ctx
				}
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			acquireClock()
			releaseClock()
		}
	})
	wg.Wait()
	close(ctxs)
	timeout := time.After(5 * time.Second)
	for ctx := range ctxs {
		select {
		case <-ctx.Done():
		case <-timeout:
			t.Fatal("a call's Done channel is still open 5s after its 5ms deadline")
		}
	}
}

// TestPoolWaitEndsAtL2Timeout: with every pooled connection taken, a read waits for one no longer
// than L2Timeout (not the client's PoolTimeout), and the caller's own cancellable context does not
// change that.
func TestPoolWaitEndsAtL2Timeout(t *testing.T) {
	e := newMiniEnv(t)
	rdb := redis.NewClient(&redis.Options{Addr: e.mr.Addr(), ContextTimeoutEnabled: true, PoolSize: 1, PoolTimeout: 10 * time.Second})
	t.Cleanup(func() { _ = rdb.Close() })
	o := e.opts()
	o.Redis, o.L2Timeout, o.L1Size = rdb, 100*time.Millisecond, -1
	c := newCache[string](e, o)

	// The only connection blocks in BLPOP until the test pushes to the list.
	blocked := make(chan error, 1)
	go func() { blocked <- rdb.BLPop(context.Background(), 10*time.Second, "hold").Err() }()
	defer func() {
		e.mr.Lpush("hold", "x")
		if err := <-blocked; err != nil {
			t.Errorf("BLPOP: %v", err)
		}
	}()
	eventually(t, func() error {
		if s := rdb.PoolStats(); s.IdleConns != 0 || s.TotalConns != 1 {
			return errors.New("the BLPOP has not taken the connection yet")
		}
		return nil
	})

	for _, tc := range []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
	}{
		{"background", func() (context.Context, context.CancelFunc) { return context.Background(), func() {} }},
		{"cancellable", func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }},
		{"later deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), time.Minute)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := tc.ctx()
			defer cancel()
			before := c.Stats().L2Errors
			start := time.Now()
			_, err := c.Get(ctx, NewKey("artist", "1"))
			took := time.Since(start)
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("Get = %v, want ErrNotFound (Redis failures fail open)", err)
			}
			if took < 90*time.Millisecond || took > 2*time.Second {
				t.Errorf("Get took %v waiting for a connection; want about L2Timeout (100ms), far under PoolTimeout (10s)", took)
			}
			if c.Stats().L2Errors == before {
				t.Error("the timed-out pool wait was not counted as an L2 error")
			}
		})
	}
}
