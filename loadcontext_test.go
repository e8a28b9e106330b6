package imgcache

import (
	"context"
	"errors"
	"runtime"
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
// left running.
func TestLoadContextEndsWithTheLoad(t *testing.T) {
	c, err := New[ImageMeta](Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var left context.Context
	var cancel context.CancelFunc
	_, err = c.GetOrLoad(ctx, NewKey("artist", "end"), func(lctx context.Context) (ImageMeta, error) {
		left, cancel = context.WithCancel(lctx) // left running: cancelled only after the check
		return sampleMeta("end"), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	select {
	case <-left.Done():
	case <-time.After(time.Second):
		t.Fatal("a context derived from the load's outlived the load")
	}
}
