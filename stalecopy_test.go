package imgcache

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// The fail-safe copies a stale entry while hits on that key update its place in the policy: the
// copy must not race them (run with -race).
func TestFailSafeCopyDoesNotRaceHits(t *testing.T) {
	c, err := New[int](Options{L1Size: 1, StaleTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	k := NewKey("artist", "1")
	down := errors.New("database down")
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				_, _ = c.Get(context.Background(), k)
			}
		}
	})
	for i := range 30 {
		if err := c.Set(context.Background(), k, i, WithTTL(time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Millisecond)
		v, err := c.GetOrLoad(context.Background(), k, func(context.Context) (int, error) { return 0, down })
		if err != nil || v != i {
			t.Fatalf("GetOrLoad with the loader down = %d, %v; want the stale %d", v, err, i)
		}
	}
	close(stop)
	wg.Wait()
}
