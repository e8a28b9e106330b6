package imgcache

import (
	"context"
	"errors"
	"testing"
	"time"
)

// README (Batch reads, Soft timeout): a key gets its stale value past SoftLoadTimeout only if it
// was "not invalidated since the call began". A Delete that runs after the batch's read of Redis
// (which found the stale value) but before the batch claims its flights is not seen: the flight's
// sequence is taken at the claim, after the Delete, so the deleted value is served.
func TestGetOrLoadManySoftTimeoutSkipsAValueDeletedDuringTheCall(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "predel")
	hold := newHold("mget", "", true) // held after the batch's read of Redis ran
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 50 * time.Millisecond
	w := newCache[ImageMeta](e, opts)
	aopts := opts
	aopts.Redis = heldClient(t, e, hold)
	a := newCache[ImageMeta](e, aopts)
	if _, err := w.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("predel", 1), nil }, WithTTL(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond) // expired: stale in Redis, within StaleTTL
	release := make(chan struct{})
	defer close(release)
	slow := func(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
		select {
		case <-release:
		case <-time.After(2 * time.Second):
		}
		return map[Key]ImageMeta{k: metaV("predel", 2)}, nil
	}
	type result struct {
		v     ImageMeta
		found bool
		err   error
	}
	done := make(chan result, 1)
	go func() {
		vals, found, err := a.GetOrLoadMany(ctx, []Key{k}, slow)
		done <- result{vals[0], found[0], err}
	}()
	select {
	case <-hold.held:
	case <-time.After(2 * time.Second):
		t.Fatal("the batch's read of Redis never ran")
	}
	if err := a.Delete(ctx, k); err != nil { // during the call
		t.Fatal(err)
	}
	close(hold.release)
	r := <-done
	if r.err == nil && r.found && r.v.ETag == metaV("predel", 1).ETag {
		t.Errorf("GetOrLoadMany served the value a Delete during the call removed (%s), past the soft timeout", r.v.ETag)
	}
}

// Stats.Refreshes counts "background loads started by ... a soft timeout". A batch whose stale key
// was loaded and answered before the soft timeout fired, while another key (no stale value) still
// waits for another instance's lease, starts no background load and serves no stale value; yet
// the timer's callback counts a refresh (it "publishes" to a flight settled already).
func TestGetOrLoadManySoftTimeoutCountsNoRefreshWhenNothingWasServed(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 100 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	s, n := NewKey("artist", "rs"), NewKey("artist", "rn")
	if _, _, err := c.GetOrLoadMany(ctx, []Key{s}, (&countingBatchLoader{}).load, WithTTL(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond) // s is stale
	// Another instance is loading n; it fails 300ms from now (its lease goes, no value).
	if err := e.rdb.Set(ctx, c.leaseKey(n), "other", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(300 * time.Millisecond)
		e.rdb.Del(context.Background(), c.leaseKey(n))
	}()
	before := c.Stats()
	vals, found, err := c.GetOrLoadMany(ctx, []Key{s, n}, (&countingBatchLoader{}).load)
	if err != nil || !found[0] || !found[1] || vals[0].ETag != metaV(s.String(), 1).ETag {
		t.Fatalf("%v %v %v", vals, found, err)
	}
	after := c.Stats()
	if after.StaleServed != before.StaleServed {
		t.Fatalf("StaleServed +%d: s's load should have answered before the soft timeout", after.StaleServed-before.StaleServed)
	}
	if d := after.Refreshes - before.Refreshes; d != 0 {
		t.Errorf("Refreshes +%d with no stale value served and no load left running for a caller who left", d)
	}
}

// Same root cause, fail-safe (pre-existing): a failing load after a Delete during the call serves
// the deleted stale value read before the claim.
func TestGetOrLoadManyFailSafeSkipsAValueDeletedDuringTheCall(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "predelfs")
	hold := newHold("mget", "", true)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	w := newCache[ImageMeta](e, opts)
	aopts := opts
	aopts.Redis = heldClient(t, e, hold)
	a := newCache[ImageMeta](e, aopts)
	if _, err := w.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("predelfs", 1), nil }, WithTTL(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond)
	failing := func(context.Context, []Key) (map[Key]ImageMeta, error) { return nil, errors.New("database down") }
	type result struct {
		v     ImageMeta
		found bool
		err   error
	}
	done := make(chan result, 1)
	go func() {
		vals, found, err := a.GetOrLoadMany(ctx, []Key{k}, failing)
		done <- result{vals[0], found[0], err}
	}()
	select {
	case <-hold.held:
	case <-time.After(2 * time.Second):
		t.Fatal("the batch's read of Redis never ran")
	}
	if err := a.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	close(hold.release)
	r := <-done
	if r.err == nil && r.found && r.v.ETag == metaV("predelfs", 1).ETag {
		t.Errorf("the fail-safe served the value a Delete during the call removed (%s)", r.v.ETag)
	}
}
