// Package bench compares imgcache with its peers: golang-lru, otter, sturdyc and go-redis/cache in
// process, and go-redis/cache and plain go-redis against a real Redis. Every peer gets the same
// keys, the same ImageMeta values and the same L1 capacity.
//
// The benchmarks are in bench_test.go; the hit-ratio simulation is in hitratio.go and
// cmd/hitratio; scripts/bench.sh at the repository root runs everything. See BENCHMARKS.md.
package bench

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/imgcache/imgcache"
)

// L1Capacity is the in-process capacity every peer is given, imgcache's default.
const L1Capacity = 10_000

// Zipf workload: exponent and key space of the mixed workload and of the hit-ratio traces.
const (
	ZipfS    = 1.1
	ZipfKeys = 100_000
)

var baseModTime = time.Date(2024, 3, 1, 12, 0, 0, 0, time.UTC)

// Meta returns the ImageMeta of artist id: the value every peer stores for key id.
func Meta(id int) imgcache.ImageMeta {
	h := fnv.New64a()
	_, _ = h.Write([]byte(strconv.Itoa(id)))
	return imgcache.ImageMeta{
		Path:     "/srv/images/artists/" + strconv.Itoa(id) + "/avatar.webp",
		Size:     int64(20_000 + id%50_000),
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     fmt.Sprintf(`"%016x"`, h.Sum64()),
		ModTime:  baseModTime.Add(time.Duration(id) * time.Second),
	}
}

// Key returns the imgcache key of artist id's avatar, and the string the peers use for it
// (Key.String, so that every peer hashes strings of the same length).
func Key(id int) (imgcache.Key, string) {
	k := imgcache.NewKey("artist", strconv.Itoa(id)).With("type", "avatar").With("size", "512")
	return k, k.String()
}

// KeySet is n keys with their strings and values, ids 0..n-1.
type KeySet struct {
	Keys  []imgcache.Key
	Strs  []string
	Metas []imgcache.ImageMeta
}

// NewKeySet builds ids first..first+n-1.
func NewKeySet(first, n int) *KeySet {
	ks := &KeySet{Keys: make([]imgcache.Key, n), Strs: make([]string, n), Metas: make([]imgcache.ImageMeta, n)}
	for i := range n {
		ks.Keys[i], ks.Strs[i] = Key(first + i)
		ks.Metas[i] = Meta(first + i)
	}
	return ks
}

// ZipfTrace returns n draws of key indices in [0, keys) from a Zipf distribution with exponent s,
// deterministic for a seed. Index 0 is the most popular key.
func ZipfTrace(n, keys int, s float64, seed uint64) []int32 {
	z := newZipf(rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), s, keys)
	t := make([]int32, n)
	for i := range t {
		t[i] = int32(z.next())
	}
	return t
}

// ScanTrace is a Zipf trace interleaved with scans: blocks of zipfRun Zipf draws over [0, keys),
// each followed by a sequential scan of scanRun ids from keys upwards that are never seen again,
// until n lookups. It returns the trace and the largest id in it plus one.
func ScanTrace(n, keys int, s float64, zipfRun, scanRun int, seed uint64) ([]int32, int) {
	z := newZipf(rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), s, keys)
	t := make([]int32, 0, n)
	next := keys
	for len(t) < n {
		for i := 0; i < zipfRun && len(t) < n; i++ {
			t = append(t, int32(z.next()))
		}
		for i := 0; i < scanRun && len(t) < n; i++ {
			t = append(t, int32(next))
			next++
		}
	}
	return t, next
}

// zipf draws from a Zipf distribution over [0, n) with P(k) proportional to 1/(k+1)^s, by
// inverting its cumulative distribution (binary search over a table): exact for any s > 0.
type zipf struct {
	r   *rand.Rand
	cdf []float64
}

func newZipf(r *rand.Rand, s float64, n int) *zipf {
	cdf := make([]float64, n)
	sum := 0.0
	for k := range n {
		sum += 1 / math.Pow(float64(k+1), s)
		cdf[k] = sum
	}
	for k := range cdf {
		cdf[k] /= sum
	}
	return &zipf{r: r, cdf: cdf}
}

func (z *zipf) next() int {
	u := z.r.Float64()
	lo, hi := 0, len(z.cdf)-1
	for lo < hi {
		mid := (lo + hi) / 2
		if z.cdf[mid] < u {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo
}
