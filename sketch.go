package imgcache

// sketch is a count-min sketch of 4-bit counters, the frequency estimate of TinyLFU (Einziger,
// Friedman and Manes, 2017), laid out as Caffeine's: the key's hash picks a 64-byte block of eight
// words, and each of its four counters lies in a different word of that block, at an offset chosen
// by other bits of the hash; the estimate is the smallest of the four.
// After 10 increments per tracked entry all counters are halved, so the sketch forgets old
// popularity. It is not safe for concurrent use: each L1 shard owns one, under its lock.
type sketch struct {
	table     []uint64 // 16 counters of 4 bits per word
	mask      uint64
	additions int
	sampleAt  int // additions before the counters are halved
}

func newSketch(entries int) *sketch {
	n := 8
	for n < entries { // one word (16 counters) of room per entry, in whole blocks of eight
		n *= 2
	}
	return &sketch{table: make([]uint64, n), mask: uint64(n/8 - 1), sampleAt: 10 * max(entries, 1)}
}

// at returns the four counters of a hash, as word indexes and bit offsets.
func (s *sketch) at(h uint64) (words [4]uint64, offs [4]uint) {
	h *= 0x9E3779B97F4A7C15 // spread the bits: the shard already used the low ones
	block := (h >> 40 & s.mask) * 8
	for i := range words {
		words[i] = block + uint64(i)*2 + (h>>i)&1
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
	s.additions /= 2
}
