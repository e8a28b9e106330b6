package imgcache

import "math/bits"

// sketch is a count-min sketch of 4-bit counters, the frequency estimate of TinyLFU (Einziger,
// Friedman and Manes, 2017), laid out as Caffeine's: the key's hash picks a 64-byte block of eight
// words, and each of its four counters lies in a different word of that block, at an offset chosen
// by other bits of the hash; the estimate is the smallest of the four.
// After 10 increments per tracked entry all counters are halved, so the sketch forgets old
// popularity. It is not safe for concurrent use: each L1 shard owns one, under its lock.
//
// Beside it, a doorkeeper (the paper's, used as go-redis/cache's TinyLFU uses it): a Bloom filter of
// the keys that have asked for admission since the last halving. A key asking for the first time is
// turned away and remembered (see admit). Without it, one pass over ten times the cache's size
// (a cold start, a batch job) replaced the cache with its last keys: those are seen once, as are
// the entries they replace, and every halving gave the newcomers the edge, since it zeroes the
// counters of keys seen once. After such a pass the Zipf workload's hit ratio took 250,000 lookups
// to climb from 78% back to 86% (TestL1RecoversFromScan).
type sketch struct {
	table     []uint64 // 16 counters of 4 bits per word
	mask      uint64
	additions int
	sampleAt  int // additions before the counters are halved

	door     []uint64 // the doorkeeper's bits, cleared at every halving
	doorMask uint64
}

func newSketch(entries int) *sketch {
	n := 8
	for n < entries { // one word (16 counters) of room per entry, in whole blocks of eight
		n *= 2
	}
	sampleAt := 10 * max(entries, 1)
	// Eight bits per addition of a sampling period: the keys asking for admission in one are its
	// misses, at most all of its additions, so false positives stay near 1% (four probes) even
	// during a scan. On the scan in TestL1RecoversFromScan, four bits kept 92% of the hot keys and
	// sixteen 97%, against 96% here: 4 KB per shard of 312 entries, 13 bytes per entry.
	d := 64
	for d < 8*sampleAt {
		d *= 2
	}
	return &sketch{table: make([]uint64, n), mask: uint64(n/8 - 1), sampleAt: sampleAt,
		door: make([]uint64, d/64), doorMask: uint64(d - 1)}
}

// admit reports whether the key with hash h has asked for admission before, since the last
// halving; if not, it remembers that it has now. The doorkeeper's four probes come from the hash by
// double hashing.
func (s *sketch) admit(h uint64) bool {
	// Other bits than the counters' (at). The product's low bits are the hash's, which the shard
	// fixed: rotated up, out of the first probe's reach.
	h = bits.RotateLeft64(h*0xff51afd7ed558ccd, 32)
	step := h>>32 | 1
	seen := true
	for range 4 {
		bit := h & s.doorMask
		if w, m := bit/64, uint64(1)<<(bit%64); s.door[w]&m == 0 {
			s.door[w] |= m
			seen = false
		}
		h += step
	}
	return seen
}

// at returns the four counters of a hash, as word indexes and bit offsets.
func (s *sketch) at(h uint64) (words [4]uint64, offs [4]uint) {
	// Spread the bits. The product's low bits depend on the hash's low bits alone, which the shard
	// fixed: the word of each pair is picked by high bits.
	h *= 0x9E3779B97F4A7C15
	block := (h >> 40 & s.mask) * 8
	for i := range words {
		words[i] = block + uint64(i)*2 + (h>>(60+i))&1
		offs[i] = uint(h>>(8+4*i)&15) * 4
	}
	return words, offs
}

// increment counts one access to the key with hash h.
func (s *sketch) increment(h uint64) {
	words, offs := s.at(h)
	added := false
	for i, o := range offs {
		if w := words[i]; (s.table[w]>>o)&15 < 15 {
			s.table[w] += 1 << o
			added = true
		}
	}
	if added {
		if s.additions++; s.additions >= s.sampleAt {
			s.halve()
		}
	}
}

// estimate returns the smallest of the key's counters.
func (s *sketch) estimate(h uint64) uint64 {
	words, offs := s.at(h)
	est := uint64(15)
	for i, o := range offs {
		est = min(est, (s.table[words[i]]>>o)&15)
	}
	return est
}

// halve ages every counter: shifting each word right by one and clearing the bit that crossed
// into the next counter halves all 16 counters at once.
func (s *sketch) halve() {
	for i := range s.table {
		s.table[i] = s.table[i] >> 1 & 0x7777777777777777
	}
	clear(s.door)
	s.additions /= 2
}
