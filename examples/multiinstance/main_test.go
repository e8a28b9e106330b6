package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// TestMain fails the run if a goroutine outlives the tests: run must close its three caches, their
// clients and the embedded miniredis on every path.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestRunPropagatesThroughTheBus runs the program against a miniredis the test owns, so it can
// check what the program left in Redis as well as what it reported.
func TestRunPropagatesThroughTheBus(t *testing.T) {
	mr := miniredis.RunT(t)
	var out bytes.Buffer
	res, err := run(context.Background(), mr.Addr(), "t_multiinstance", &out)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	t.Log("\n" + out.String())

	if want := [3]string{`"v1"`, `"v1"`, `"v1"`}; res.Initial != want {
		t.Errorf("first reads served %v, want %v", res.Initial, want)
	}
	if len(res.Lags) != 4 {
		t.Fatalf("%d propagation delays, want 4 (Set, InvalidateEntity, InvalidateTags, InvalidatePattern)", len(res.Lags))
	}
	for i, d := range res.Lags {
		if d <= 0 || d >= deadline {
			t.Errorf("step %d: propagation took %v, want within (0, %v)", i+2, d, deadline)
		}
	}
	if res.PatternRemoved != 3 {
		t.Errorf("InvalidatePattern removed %d values, want 3 (avatars of artists 1, 2 and 3)", res.PatternRemoved)
	}
	// A loads artist 1 (v1), B loads it again after InvalidateEntity (v3), A loads artists 2 and 3.
	// Every other read is served by Redis or L1: C finds B's v3 in Redis.
	if res.Loads != 4 {
		t.Errorf("database loads = %d, want 4", res.Loads)
	}

	// Only A writes or invalidates: the avatar's Set, InvalidateEntity, two tagged Sets,
	// InvalidateTags and InvalidatePattern are six messages, and B and C apply all of them.
	a, b, c := res.Stats[0], res.Stats[1], res.Stats[2]
	if a.BusSent != 6 || a.BusReceived != 0 {
		t.Errorf("A: BusSent %d, BusReceived %d; want 6, 0", a.BusSent, a.BusReceived)
	}
	for name, s := range map[string]struct{ sent, received uint64 }{"B": {b.BusSent, b.BusReceived}, "C": {c.BusSent, c.BusReceived}} {
		if s.sent != 0 || s.received != 6 {
			t.Errorf("%s: BusSent %d, BusReceived %d; want 0, 6", name, s.sent, s.received)
		}
	}
	// B finds in Redis avatar 1 at first, v2 after the Set, the two covers and avatars 2 and 3; v3
	// it loads itself. C finds all of those and v3, which B has just written.
	if b.L2Hits != 6 || c.L2Hits != 7 {
		t.Errorf("L2 hits: B %d, C %d; want 6, 7", b.L2Hits, c.L2Hits)
	}
	for i, s := range res.Stats {
		if s.L2Errors != 0 || s.BusErrors != 0 {
			t.Errorf("instance %d: L2Errors %d, BusErrors %d; want none", i, s.L2Errors, s.BusErrors)
		}
	}

	// Every value the run cached was invalidated: no data key is left, only bookkeeping ("%...").
	rdb := redis.NewClient(&redis.Options{Addr: mr.Addr()})
	defer rdb.Close()
	keys, err := rdb.Keys(context.Background(), "t_multiinstance:*").Result() // a test's own miniredis
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if !strings.HasPrefix(k, "t_multiinstance:%") {
			t.Errorf("data key %q survived the invalidations", k)
		}
	}

	for _, want := range []string{
		`1. artist 1's avatar on A, B, C: ["v1" "v1" "v1"] (database loads: 1)`,
		`2. A.Set(ETag "v2"): B and C serve "v2" after `,
		`3. database "v3", A.InvalidateEntity("artist", "1"): B and C serve "v3" after `,
		`4. A.InvalidateTags("artist:1"): both album covers gone from B and C after `,
		`5. A.InvalidatePattern("artist:*"): avatars 1-3 gone from B and C after `,
		"   removed 3 values from Redis\ndatabase loads: 4\n",
		"A        6           0",
		"B        0           6",
		"C        0           6",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// TestRunEmbeddedRedis runs the program as `go run` does without REDIS_ADDR: it starts, uses and
// closes its own miniredis (goleak checks the closing).
func TestRunEmbeddedRedis(t *testing.T) {
	var out bytes.Buffer
	res, err := run(context.Background(), "", "multiinstance", &out)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, out.String())
	}
	if !strings.HasPrefix(out.String(), "redis: embedded miniredis at 127.0.0.1:") {
		t.Errorf("output does not start by naming the embedded Redis:\n%s", out.String())
	}
	if res.Stats[1].BusReceived != res.Stats[0].BusSent || res.Stats[0].BusSent == 0 {
		t.Errorf("B received %d of the %d messages A sent", res.Stats[1].BusReceived, res.Stats[0].BusSent)
	}
}

// TestRunCancelled checks the error path: a cancelled context fails the run, and everything it
// opened is still closed.
func TestRunCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out bytes.Buffer
	if _, err := run(ctx, "", "multiinstance", &out); err == nil {
		t.Fatalf("run with a cancelled context succeeded:\n%s", out.String())
	}
}
