package imgcache

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"
)

// A load runs under a context with its caller's values, no deadline, and no cancellation but
// Close's and its own end: a caller who leaves does not end it, Close does, and so do contexts the
// loader derives from it, through any chain of values, without a goroutine each to watch them.
func TestLoadContext(t *testing.T) {
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type key struct{}
	callerCtx, leave := context.WithCancel(context.WithValue(context.Background(), key{}, "caller's"))
	derived := make(chan context.Context, 1)
	checks := make(chan error, 1)
	finished := make(chan error, 1)
	atStart := runtime.NumGoroutine()
	go func() {
		_, err := c.GetOrLoad(callerCtx, NewKey("artist", "ctx"), func(lctx context.Context) (ImageMeta, error) {
			switch _, has := lctx.Deadline(); {
			case lctx.Value(key{}) != "caller's":
				checks <- errors.New("the load does not see its caller's values")
			case has:
				checks <- errors.New("the load has a deadline without LoadTimeout")
			case runtime.NumGoroutine()-atStart > 2:
				// This caller's goroutine and its flight's (its context can end): no third one
				// watches the cache's base context for the load.
				checks <- errors.New("a goroutine watches the load's context")
			default:
				before := runtime.NumGoroutine()
				var cancels []context.CancelFunc
				for i := range 100 {
					// As a tracer's span does: a value between the load's context and the
					// derived one.
					_, cancel := context.WithCancel(context.WithValue(lctx, key{}, i))
					cancels = append(cancels, cancel)
				}
				if n := runtime.NumGoroutine() - before; n >= 50 {
					checks <- errors.New("deriving contexts from the load's started a goroutine each")
				} else {
					checks <- nil
				}
				for _, cancel := range cancels {
					cancel()
				}
			}
			d, cancel := context.WithTimeout(lctx, time.Hour)
			defer cancel()
			derived <- d
			<-d.Done()
			finished <- d.Err()
			return ImageMeta{}, d.Err()
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("the caller who left got %v, want context.Canceled", err)
		}
	}()
	if err := <-checks; err != nil {
		t.Fatal(err)
	}
	d := <-derived
	leave()
	select {
	case <-d.Done():
		t.Fatal("the load ended when its caller left")
	case <-time.After(50 * time.Millisecond):
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-finished; !errors.Is(err, context.Canceled) {
		t.Errorf("a context derived from the load's ended with %v after Close, want context.Canceled", err)
	}
}

// The load's context ends when the load does, and so do contexts the loader derived from it and
// left running: GetOrLoad's and GetOrLoadMany's alike. Neither has a deadline without LoadTimeout.
func TestLoadContextEndsWithTheLoad(t *testing.T) {
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	left := map[string]context.Context{} // by the call whose load derived it
	derive := func(call string, lctx context.Context) {
		if _, has := lctx.Deadline(); has {
			t.Errorf("%s's load has a deadline without LoadTimeout", call)
		}
		l, cancel := context.WithCancel(lctx) // left running: cancelled only after the check
		t.Cleanup(cancel)
		left[call] = l
	}
	_, err = c.GetOrLoad(ctx, NewKey("artist", "end"), func(lctx context.Context) (ImageMeta, error) {
		derive("GetOrLoad", lctx)
		return sampleMeta("end"), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.GetOrLoadMany(ctx, []Key{NewKey("artist", "b1")}, func(lctx context.Context, ks []Key) (map[Key]ImageMeta, error) {
		derive("GetOrLoadMany", lctx)
		return map[Key]ImageMeta{ks[0]: sampleMeta("b1")}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for call, l := range left {
		select {
		case <-l.Done():
		case <-time.After(time.Second):
			t.Errorf("a context derived from %s's load outlived the load", call)
		}
	}
	if len(left) != 2 {
		t.Errorf("%d loads ran, want 2", len(left))
	}
}

// A load's context reports its end through Err alike whether or not anything has asked for its Done
// channel yet (the channel is made on demand), and a channel asked for after the end is closed.
func TestLoadContextErrWithoutDone(t *testing.T) {
	type key struct{}
	caller, leave := context.WithCancelCause(context.WithValue(context.Background(), key{}, "v"))
	base, closeCache := context.WithCancel(context.Background())
	defer closeCache()

	ended := newLoadCtx(context.WithoutCancel(caller), base)
	leave(errors.New("the caller left"))
	if err := ended.Err(); err != nil {
		t.Fatalf("Err after the caller left = %v, want nil", err)
	}
	if cause := context.Cause(ended); cause != nil {
		t.Fatalf("Cause after the caller left = %v, want nil", cause)
	}
	ended.end()
	if err := ended.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err after the end = %v, want context.Canceled", err)
	}
	select {
	case <-ended.Done():
	default:
		t.Fatal("Done asked for after the end is open")
	}
	if v := ended.Value(key{}); v != "v" {
		t.Fatalf("Value = %v, want the caller's", v)
	}

	closed := newLoadCtx(context.Background(), base)
	closeCache()
	if err := closed.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err after Close = %v, want context.Canceled", err)
	}
	select {
	case <-closed.Done():
	default:
		t.Fatal("Done asked for after Close is open")
	}
	closed.end() // ending a closed flight's context is harmless
}

// Close ends a GetOrLoadMany's load context, as it ends a GetOrLoad's (TestLoadContext).
func TestBatchLoadContextEndsWithClose(t *testing.T) {
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	started, release := make(chan context.Context), make(chan struct{})
	go func() {
		_, _, _ = c.GetOrLoadMany(context.Background(), []Key{NewKey("artist", "b2")}, func(lctx context.Context, ks []Key) (map[Key]ImageMeta, error) {
			started <- lctx
			<-release
			return nil, nil
		})
	}()
	lctx := <-started
	done := make(chan error, 1)
	go func() { done <- c.Close() }()
	select {
	case <-lctx.Done():
	case <-time.After(time.Second):
		t.Fatal("Close did not end the batch load's context")
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// gatedBase is a base context whose AfterFunc callbacks never run (AfterFunc promises only that
// they run some time after the cancellation) and whose first Err call waits for the test: it
// holds open the moment between Close and the inner context's cancellation.
type gatedBase struct {
	mu      sync.Mutex
	done    chan struct{}
	err     error
	calls   int
	inFirst chan struct{} // closed when the first Err call is waiting
	release chan struct{} // lets the first Err call go on
}

func (b *gatedBase) Deadline() (time.Time, bool)  { return time.Time{}, false }
func (b *gatedBase) Done() <-chan struct{}        { return b.done }
func (b *gatedBase) Value(any) any                { return nil }
func (b *gatedBase) AfterFunc(func()) func() bool { return func() bool { return false } }

func (b *gatedBase) Err() error {
	b.mu.Lock()
	b.calls++
	first := b.calls == 1
	b.mu.Unlock()
	if first {
		close(b.inFirst)
		<-b.release
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

func (b *gatedBase) cancel() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.err = context.Canceled
	close(b.done)
}

// Once a load's context has reported its end, it keeps reporting it, and its Done channel is
// closed, even when Close's cancellation has not reached the inner context yet. (Found by review:
// Err read base's error, then the inner context's nil.)
func TestLoadContextErrStaysSet(t *testing.T) {
	base := &gatedBase{done: make(chan struct{}), inFirst: make(chan struct{}), release: make(chan struct{})}
	l := newLoadCtx(context.Background(), base)
	first := make(chan error, 1)
	go func() { first <- l.Err() }() // no inner context yet: it waits in base.Err
	<-base.inFirst
	done := l.Done() // makes the inner context, registered with base
	base.cancel()    // Close; its AfterFunc does not run
	close(base.release)
	if err := <-first; !errors.Is(err, context.Canceled) {
		t.Fatalf("Err after Close = %v, want context.Canceled", err)
	}
	if err := l.Err(); !errors.Is(err, context.Canceled) {
		t.Fatalf("Err once more = %v: it went back", err)
	}
	select {
	case <-done:
	default:
		t.Fatal("Err reported the end, and Done is open")
	}
}

// detachedCtx drops its parent's cancellation the way contexts did before context.WithoutCancel
// (x/tools' xcontext.Detach and the like): Done is nil, and Value still asks the parent.
type detachedCtx struct{ parent context.Context }

func (d detachedCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (d detachedCtx) Done() <-chan struct{}       { return nil }
func (d detachedCtx) Err() error                  { return nil }
func (d detachedCtx) Value(k any) any             { return d.parent.Value(k) }

// context.Cause of a load's context reports its own end, never its caller's cancellation, even
// through a caller's context that passes Value on to a cancelled one. (Found by review.)
func TestLoadContextCauseIsItsOwn(t *testing.T) {
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	parent, cancel := context.WithCancelCause(context.Background())
	cancel(errors.New("the caller's request timed out"))
	var lctx context.Context
	_, err = c.GetOrLoad(detachedCtx{parent}, NewKey("artist", "cause"), func(ctx context.Context) (ImageMeta, error) {
		lctx = ctx
		if cause := context.Cause(ctx); cause != nil {
			t.Errorf("Cause during the load = %v, want nil", cause)
		}
		return sampleMeta("cause"), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if cause := context.Cause(lctx); cause != context.Canceled {
		t.Errorf("Cause after the load = %v, want context.Canceled", cause)
	}
}
