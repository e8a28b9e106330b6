package imgcache

import (
	"strconv"
	"testing"
	"time"
)

// registerScript's contract, one state at a time: what it returns, and what it leaves in the meta
// hash and the generation key, with their TTLs.
func TestRegisterScript(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	n := 0
	// entity returns a new entity's meta hash and generation key.
	entity := func() (meta, gen string) {
		n++
		id := strconv.Itoa(n)
		return c.l2.entityMeta("artist", id), c.l2.entityGen("artist", id)
	}
	// register runs the script as registerMany does: keys are the meta hash and, for an entity,
	// its generation key.
	register := func(t *testing.T, keys []string, initGen uint64, metaTTL time.Duration, member string, bump bool, valueTTL time.Duration) (g, d uint64) {
		t.Helper()
		b := "0"
		if bump {
			b = "1"
		}
		cmd := registerScript.Run(ctx, e.rdb, keys, initGen, metaTTL.Milliseconds(), member, b, valueTTL.Milliseconds())
		g, d, err := metaReply(cmd)
		if err != nil {
			t.Fatalf("registerScript: %v", err)
		}
		return g, d
	}
	wantTTL := func(t *testing.T, key string, want time.Duration) {
		t.Helper()
		if got := e.rdb.PTTL(ctx, key).Val(); got > want || got < want-2*time.Second {
			t.Errorf("PTTL %s = %v, want %v", key, got, want)
		}
	}
	wantString := func(t *testing.T, key, want string) {
		t.Helper()
		if got := e.rdb.Get(ctx, key).Val(); got != want {
			t.Errorf("GET %s = %q, want %q", key, got, want)
		}
	}

	t.Run("new entity", func(t *testing.T) {
		meta, gen := entity()
		before := time.Now()
		g, d := register(t, []string{meta, gen}, 1001, time.Minute, "member1", false, 50*time.Second)
		if g != 1001 || d != 0 {
			t.Errorf("got generation %d, delete epoch %d; want 1001, 0", g, d)
		}
		h := e.rdb.HGetAll(ctx, meta).Val()
		if len(h) != 3 || h["g"] != "1001" || h["d"] != "0" {
			t.Errorf("meta hash = %v, want g, d and one member", h)
		}
		exp, err := strconv.ParseInt(h["member1"], 10, 64)
		if want := before.Add(50 * time.Second).UnixMilli(); err != nil || exp < want-2000 || exp > want+2000 {
			t.Errorf("member's expiry = %q, want about %d (Unix ms)", h["member1"], want)
		}
		wantTTL(t, meta, time.Minute)
		wantString(t, gen, "1001")
		wantTTL(t, gen, time.Minute)
	})

	t.Run("new entity with the delete epoch bumped", func(t *testing.T) {
		meta, gen := entity()
		if g, d := register(t, []string{meta, gen}, 7, time.Minute, "", true, time.Minute); g != 7 || d != 1 {
			t.Errorf("got generation %d, delete epoch %d; want 7, 1", g, d)
		}
		if h := e.rdb.HGetAll(ctx, meta).Val(); len(h) != 2 {
			t.Errorf("meta hash = %v, want g and d only (no member given)", h)
		}
	})

	t.Run("existing entity keeps its generation", func(t *testing.T) {
		meta, gen := entity()
		register(t, []string{meta, gen}, 1001, time.Minute, "member1", false, time.Minute)
		if g, d := register(t, []string{meta, gen}, 2002, time.Minute, "member2", true, time.Minute); g != 1001 || d != 1 {
			t.Errorf("got generation %d, delete epoch %d; want 1001 (kept), 1 (bumped)", g, d)
		}
		if g, d := register(t, []string{meta, gen}, 3003, time.Minute, "member2", false, time.Minute); g != 1001 || d != 1 {
			t.Errorf("got generation %d, delete epoch %d; want 1001, 1", g, d)
		}
		if n := e.rdb.HLen(ctx, meta).Val(); n != 4 {
			t.Errorf("meta hash has %d fields, want g, d and two members", n)
		}
	})

	t.Run("generation key rewritten", func(t *testing.T) {
		meta, gen := entity()
		register(t, []string{meta, gen}, 1001, time.Minute, "m", false, time.Minute)
		e.rdb.Del(ctx, gen) // as an eviction would
		register(t, []string{meta, gen}, 2002, time.Minute, "m", false, time.Minute)
		wantString(t, gen, "1001")
		wantTTL(t, gen, time.Minute)
		e.rdb.Set(ctx, gen, "5", 0) // out of step, and without a TTL
		register(t, []string{meta, gen}, 2002, time.Minute, "m", false, time.Minute)
		wantString(t, gen, "1001")
		wantTTL(t, gen, time.Minute)
	})

	t.Run("TTLs only grow", func(t *testing.T) {
		meta, gen := entity()
		register(t, []string{meta, gen}, 1, time.Minute, "m", false, time.Minute)
		register(t, []string{meta, gen}, 1, 10*time.Second, "m", false, 5*time.Second)
		wantTTL(t, meta, time.Minute)
		wantTTL(t, gen, time.Minute)
		register(t, []string{meta, gen}, 1, 2*time.Minute, "m2", false, time.Minute)
		wantTTL(t, meta, 2*time.Minute)
		wantTTL(t, gen, 2*time.Minute)
	})

	t.Run("tag", func(t *testing.T) {
		meta := c.l2.tagMeta("fleet" + strconv.Itoa(n))
		if g, d := register(t, []string{meta}, 42, time.Minute, "ns:artist:1:0123456789abcdef", false, time.Minute); g != 42 || d != 0 {
			t.Errorf("got generation %d, delete epoch %d; want 42, 0", g, d)
		}
		wantTTL(t, meta, time.Minute)
		if n := e.rdb.HLen(ctx, meta).Val(); n != 3 {
			t.Errorf("tag's meta hash has %d fields, want g, d and one member", n)
		}
	})

	t.Run("expired members pruned", func(t *testing.T) {
		meta, gen := entity()
		register(t, []string{meta, gen}, 1, time.Minute, "live", false, time.Minute)
		for i := range 200 { // values that have already expired, by Redis's clock
			register(t, []string{meta, gen}, 1, time.Minute, "gone"+strconv.Itoa(i), false, -time.Second)
		}
		h := e.rdb.HGetAll(ctx, meta).Val()
		if h["live"] == "" {
			t.Error("the live member was pruned")
		}
		// A prune runs when the hash passes 64 fields: at most 64 fields stay after it.
		if len(h) > 64 || h["p"] != "64" {
			t.Errorf("meta hash has %d fields, prune mark %q; want at most 64 and 64", len(h), h["p"])
		}
	})
}
