package imgcache

import (
	"math"
	"math/bits"
	"math/rand/v2"
	"testing"
)

// A shard's keys share the low bits of their hashes (the shard index), and so do the low bits of
// any odd multiple of them. The sketch and the doorkeeper of a shard must still use all of their
// room: a choice made from those bits would leave part of it idle and lower the hit ratio.
func TestSketchOfOneShardUsesAllOfItsRoom(t *testing.T) {
	const shardBits = 7 // maxShards
	r := rand.New(rand.NewPCG(1, 2))
	s := newSketch(1000)
	keys := 4 * len(s.table)
	for range keys {
		h := r.Uint64()<<shardBits | 0x55 // one shard's keys
		s.increment(h)
		s.admit(h)
	}
	if idle := countZero(s.table); idle > len(s.table)/50 {
		t.Errorf("%d of the sketch's %d words were never counted in", idle, len(s.table))
	}
	// Four probes per key over d bits set 1 - e^(-4n/d) of them, if every probe can reach every bit.
	set, d := 0, 64*len(s.door)
	for _, w := range s.door {
		set += bits.OnesCount64(w)
	}
	if want := 1 - math.Exp(-4*float64(keys)/float64(d)); float64(set)/float64(d) < 0.95*want {
		t.Errorf("the doorkeeper set %.1f%% of its bits, want about %.1f%%", 100*float64(set)/float64(d), 100*want)
	}
}

func countZero(words []uint64) int {
	n := 0
	for _, w := range words {
		if w == 0 {
			n++
		}
	}
	return n
}
