package bench

import (
	"testing"
)

// TestBelady checks the optimum on a trace small enough to reason about.
func TestBelady(t *testing.T) {
	// Size 2. a b c a b c: MIN with bypass keeps a and b, bypasses c (never used again after the
	// last c it could serve), and hits a and b once each.
	if got := Belady(2, []int32{0, 1, 2, 0, 1, 2}); got != 2 {
		t.Fatalf("Belady = %d hits, want 2", got)
	}
	if got := Belady(3, []int32{0, 1, 2, 0, 1, 2}); got != 3 {
		t.Fatalf("Belady = %d hits, want 3", got)
	}
}

// TestSimulateSmall replays short traces through every policy: no policy may beat the optimum,
// and on the Zipf trace every one must hit at all.
func TestSimulateSmall(t *testing.T) {
	const keys = 5_000
	zipf := ZipfTrace(50_000, keys, ZipfS, 1)
	scan, maxID := ScanTrace(50_000, keys, ZipfS, 3_000, 2_000, 2)
	tk := NewTraceKeys(maxID)
	res, err := Simulate([]Trace{{"zipf", zipf, tk}, {"scan", scan, tk}}, Policies(), []int{500})
	if err != nil {
		t.Fatal(err)
	}
	opt := map[string]int{}
	for _, r := range res {
		if r.Policy == "Belady (optimal, with bypass)" {
			opt[r.Trace] = r.Hits
		}
	}
	for _, r := range res {
		t.Logf("%-5s %-30s %.4f", r.Trace, r.Policy, r.Ratio())
		if r.Hits > opt[r.Trace] {
			t.Errorf("%s on %s: %d hits, more than the optimum's %d", r.Policy, r.Trace, r.Hits, opt[r.Trace])
		}
		if r.Trace == "zipf" && r.Ratio() < 0.2 {
			t.Errorf("%s on zipf: hit ratio %.3f, implausibly low", r.Policy, r.Ratio())
		}
	}
}
