package imgcache

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// BenchmarkClientCPU measures imgcache's client CPU alone. Against a real Redis the client's CPU,
// Redis's and the kernel's share the same cores; here a go-redis hook answers GET and MGET from a
// map of what miniredis holds, so imgcache (L1 off) and its floor (the same go-redis command and a
// decode of the same bytes) cost client CPU only. Each pair is timed in one loop, alternating which
// goes first, as bench/'s BenchmarkPaired does: ratio is imgcache's time over the floor's.
//
//	go test -run '^$' -bench ClientCPU -count 6 .
func BenchmarkClientCPU(b *testing.B) {
	const n = 100
	keys, _ := benchKeySet()
	keys = keys[:n]
	e := newMiniEnv(b)
	o := e.opts()
	o.L1Size = -1
	c := newCache[ImageMeta](e, o)
	for _, k := range keys {
		if err := c.Set(ctx, k, sampleMeta(k.ID())); err != nil {
			b.Fatal(err)
		}
	}
	answers := map[string]string{}
	for _, k := range e.mr.Keys() {
		if v, err := e.mr.Get(k); err == nil {
			answers[k] = v
		}
	}
	if _, _, err := c.GetMany(ctx, keys); err != nil { // the instance now trusts every generation
		b.Fatal(err)
	}
	e.rdb.AddHook(mapAnswers(answers))
	rkeys := make([]string, n)
	for i, k := range keys {
		rkeys[i] = e.redisKey(k)
	}
	decode := func(data []byte, v *ImageMeta) {
		env, err := decodeEnvelope(data, c.codecID, c.maxValue)
		if err == nil {
			err = v.UnmarshalBinary(env.payload)
		}
		if err != nil {
			b.Fatal(err)
		}
	}

	// floorGet is the floor of a read of keys[i%n]: a GET through the same hook, and a decode.
	floorGet := func(b *testing.B, i int) {
		data, err := e.rdb.Get(ctx, rkeys[i%n]).Bytes()
		if err != nil {
			b.Fatal(err)
		}
		var v ImageMeta
		decode(data, &v)
	}
	b.Run("Get", func(b *testing.B) {
		var i int
		pairedCPU(b, func() {
			if v, err := c.Get(ctx, keys[i%n]); err != nil || v.Size == 0 {
				b.Fatal("miss", err)
			}
		}, func() {
			floorGet(b, i)
			i++
		})
	})
	b.Run("GetOrLoad", func(b *testing.B) {
		var i int
		load := func(context.Context) (ImageMeta, error) { b.Fatal("load called on a hit"); return ImageMeta{}, nil }
		pairedCPU(b, func() {
			if v, err := c.GetOrLoad(ctx, keys[i%n], load); err != nil || v.Size == 0 {
				b.Fatal("miss", err)
			}
		}, func() {
			floorGet(b, i)
			i++
		})
	})
	b.Run("GetMany", func(b *testing.B) {
		pairedCPU(b, func() {
			if vals, found, err := c.GetMany(ctx, keys); err != nil || !found[n-1] || vals[n-1].Size == 0 {
				b.Fatal("miss", err)
			}
		}, func() {
			res, err := e.rdb.MGet(ctx, rkeys...).Result()
			if err != nil {
				b.Fatal(err)
			}
			vals := make([]ImageMeta, n)
			for i, r := range res {
				s, _ := r.(string)
				decode([]byte(s), &vals[i])
			}
		})
	})
}

// pairedCPU runs a and floor b.N times each in one loop, alternating which goes first, and
// reports both mean times and their ratio.
func pairedCPU(b *testing.B, a, floor func()) {
	b.ReportAllocs()
	var at, ft time.Duration
	for i := 0; b.Loop(); i++ {
		first, second, t1, t2 := a, floor, &at, &ft
		if i&1 == 1 {
			first, second, t1, t2 = floor, a, &ft, &at
		}
		t0 := time.Now()
		first()
		mid := time.Now()
		second()
		*t1 += mid.Sub(t0)
		*t2 += time.Since(mid)
	}
	b.ReportMetric(float64(at)/float64(b.N), "imgcache-ns/op")
	b.ReportMetric(float64(ft)/float64(b.N), "floor-ns/op")
	b.ReportMetric(float64(at)/float64(ft), "ratio")
}

// mapAnswers is a go-redis hook that answers GET and MGET from a map, without Redis.
type mapAnswers map[string]string

func (mapAnswers) DialHook(next redis.DialHook) redis.DialHook { return next }

func (mapAnswers) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (m mapAnswers) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		args := cmd.Args()
		switch strings.ToLower(cmd.Name()) {
		case "get":
			c := cmd.(*redis.StringCmd)
			s, ok := m[args[1].(string)]
			if !ok {
				c.SetErr(redis.Nil)
				return redis.Nil
			}
			c.SetVal(s)
			return nil
		case "mget":
			switch c := cmd.(type) {
			case *redis.StringSliceCmd: // imgcache's: "" for an absent key
				vals := make([]string, len(args)-1)
				for i, a := range args[1:] {
					vals[i] = m[a.(string)]
				}
				c.SetVal(vals)
			case *redis.SliceCmd: // go-redis's MGet: nil for an absent key
				vals := make([]any, len(args)-1)
				for i, a := range args[1:] {
					if s, ok := m[a.(string)]; ok {
						vals[i] = s
					}
				}
				c.SetVal(vals)
			}
			return nil
		}
		return next(ctx, cmd)
	}
}
