package imgcache

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/cespare/xxhash/v2"
)

// hashOfNoParams is xxhash64("") in hex: the hash part of every key without parameters.
const hashOfNoParams = "ef46db3751d8e999"

// TestKeyPinnedFormat pins Key.String for one known key against xxhash computed here, over the
// canonical parameter form "name NUL value NUL name NUL value" (names normalised, sorted by name).
func TestKeyPinnedFormat(t *testing.T) {
	k := NewKey(" Artist ", "123").With("Type", "avatar").With("size", " 256 ")
	if err := k.Err(); err != nil {
		t.Fatalf("Err() = %v, want nil", err)
	}
	params := "size\x00256\x00type\x00avatar"
	want := fmt.Sprintf("artist:123:%016x", xxhash.Sum64String(params))
	if got := k.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	// The same value written out, so that a change of hash or canonical form cannot go unnoticed.
	if got, want := k.String(), "artist:123:c90502374258b50e"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := NewKey("artist", "123").String(), "artist:123:"+hashOfNoParams; got != want {
		t.Errorf("String() without parameters = %q, want %q", got, want)
	}
	if got, want := fmt.Sprintf("%#v", k), "imgcache.Key(artist:123:c90502374258b50e)"; got != want {
		t.Errorf("%%#v = %q, want %q", got, want)
	}
}

func TestKeyEquivalent(t *testing.T) {
	base := func() Key { return NewKey("artist", "123") }
	tests := []struct {
		name string
		a, b Key
	}{
		{"name camel vs snake", base().With("userID", "42"), base().With("user_id", "42")},
		{"name snake vs kebab", base().With("user_id", "42"), base().With("User-Id", "42")},
		{"name with dot and space", base().With("user.id", "42"), base().With(" USER ID ", "42")},
		{"parameter order", base().With("size", "256").With("type", "avatar"), base().With("type", "avatar").With("size", "256")},
		{"three parameters in any order",
			base().With("a", "1").With("b", "2").With("c", "3"),
			base().With("c", "3").With("a", "1").With("b", "2")},
		{"entity case-folded and trimmed", NewKey("  ARTIST ", "123"), base()},
		{"value trimmed", base().With("size", " 256\u00a0"), base().With("size", "256")},
		{"last With wins", base().With("size", "128").With("Size", "256"), base().With("size", "256")},
		{"last With wins among others",
			base().With("size", "128").With("type", "avatar").With("SIZE", "256"),
			base().With("type", "avatar").With("size", "256")},
		{"empty value", base().With("v", ""), base().With("v", "   ")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.a.Err(); err != nil {
				t.Fatalf("a.Err() = %v, want nil", err)
			}
			if err := tt.b.Err(); err != nil {
				t.Fatalf("b.Err() = %v, want nil", err)
			}
			if tt.a != tt.b {
				t.Errorf("got a != b (%#v, %#v), want ==", tt.a, tt.b)
			}
			if got, want := tt.a.String(), tt.b.String(); got != want {
				t.Errorf("got String() %q, want %q", got, want)
			}
		})
	}
}

func TestKeyDistinct(t *testing.T) {
	base := func() Key { return NewKey("artist", "123") }
	tests := []struct {
		name string
		a, b Key
	}{
		{"id case kept", NewKey("artist", "abc"), NewKey("artist", "ABC")},
		{"id not trimmed", NewKey("artist", "123"), NewKey("artist", " 123")},
		{"id prefix", NewKey("artist", "12"), NewKey("artist", "123")},
		{"entity", NewKey("artist", "1"), NewKey("album", "1")},
		{"entity with colon vs id with colon", NewKey("artist:a", "b"), NewKey("artist", "a:b")},
		{"escaped-looking id", NewKey("artist", "%3A"), NewKey("artist", ":")},
		{"value", base().With("size", "256"), base().With("size", "128")},
		{"value case kept", base().With("type", "Avatar"), base().With("type", "avatar")},
		{"name", base().With("w", "1"), base().With("h", "1")},
		{"parameter vs none", base().With("size", "256"), base()},
		{"empty value vs none", base().With("size", ""), base()},
		{"name/value boundary", base().With("a", "bc"), base().With("ab", "c")},
		{"one vs two parameters", base().With("a", "1 b 2"), base().With("a", "1").With("b", "2")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.a.Err() != nil || tt.b.Err() != nil {
				t.Fatalf("got errors %v, %v, want valid keys", tt.a.Err(), tt.b.Err())
			}
			if tt.a == tt.b {
				t.Errorf("got a == b (%#v), want different keys", tt.a)
			}
			if tt.a.String() == tt.b.String() {
				t.Errorf("got the same String() %q for both, want different", tt.a.String())
			}
		})
	}
}

func TestKeyString(t *testing.T) {
	tests := []struct {
		entity, id string
		want       string // without the hash
	}{
		{"artist", "123", "artist:123:"},
		{"Artist", "ABC", "artist:ABC:"},
		{"artist", "*", "artist:%2A:"},
		{"artist", "a:b", "artist:a%3Ab:"},
		{"artist:a", "b", "artist%3Aa:b:"},
		{"artist", "50%", "artist:50%25:"},
		{"artist", "%2A", "artist:%252A:"},
		{"artist", "[a-z]?", "artist:%5Ba-z%5D%3F:"},
		{"artist", `a\b`, "artist:a%5Cb:"},
		{"artist", "^x", "artist:%5Ex:"},
		{"artist", "{slot}", "artist:%7Bslot%7D:"},
		{"my artist", "a b", "my%20artist:a%20b:"},
		{"artist", "Björk", "artist:Björk:"},
	}
	for _, tt := range tests {
		t.Run(tt.entity+"/"+tt.id, func(t *testing.T) {
			k := NewKey(tt.entity, tt.id)
			if err := k.Err(); err != nil {
				t.Fatalf("Err() = %v, want nil", err)
			}
			if got, want := k.String(), tt.want+hashOfNoParams; got != want {
				t.Errorf("got %q, want %q", got, want)
			}
			if got, want := entityPrefix(k.Entity(), k.ID()), tt.want; got != want {
				t.Errorf("entityPrefix: got %q, want %q", got, want)
			}
		})
	}
}

// TestKeyCarriesItsRedisForm: a Key holds its Redis form from the start, so String and the Redis
// keys cost no allocation; With keeps an escaped entity and id escaped; and a key rebuilt from its
// canonical form, as the bus sends it, is == the key.
func TestKeyCarriesItsRedisForm(t *testing.T) {
	keys := []Key{
		NewKey("artist", "123"),
		NewKey("my artist", "a:b*{x}").With("size", "256"),
		NewKey("artist", "50%").With("type", "avatar").With("size", "512"),
		NewKey("Artist ", "Björk").With("Size", " 64 ").With("size", "128"),
	}
	for _, k := range keys {
		t.Run(k.String(), func(t *testing.T) {
			e, id := k.Entity(), k.ID()
			_, params := k.split()
			if got, want := k.String(), string(appendSum([]byte(entityPrefix(e, id)), xxhash.Sum64String(params))); got != want {
				t.Errorf("String() = %q, want %q (escaped parts and the hash of %q)", got, want, params)
			}
			if n := testing.AllocsPerRun(100, func() { _ = k.String() }); n != 0 {
				t.Errorf("String() allocates %v times, want 0", n)
			}
			if got, want := k.escapedHead()+":", entityPrefix(e, id); got != want {
				t.Errorf("escapedHead() = %q, want %q", got, want)
			}
			got, ok := keyFromCanonical(k.canonical())
			if !ok || got != k {
				t.Errorf("keyFromCanonical(%q) = %#v, %v; want %#v", k.canonical(), got, ok, k)
			}
		})
	}
	// Strings that are no key's canonical form.
	for _, s := range []string{"", "\x00reason", "no-nul", "e\x00", "\x00id", strings.Repeat("x", MaxKeyLen+1)} {
		if k, ok := keyFromCanonical(s); ok {
			t.Errorf("keyFromCanonical(%q) = %#v, true; want false", s, k)
		}
	}
	var zero Key
	if got := zero.escapedHead() + NewKey("", "x").escapedHead(); got != "" {
		t.Errorf("escapedHead of invalid keys = %q, want \"\"", got)
	}
}

// TestKeyHashesSpreadStructuredKeys: keys built from the same strings in different roles (an
// entity and id that are also a parameter's name and value, or two keys that swap their head and
// parameter) get different hashes. L1 keeps one entry per hash, so keys that shared one would
// evict each other.
func TestKeyHashesSpreadStructuredKeys(t *testing.T) {
	seen := map[uint64]Key{}
	add := func(k Key) {
		t.Helper()
		if err := k.Err(); err != nil {
			t.Fatal(err)
		}
		if k.h == 0 {
			t.Errorf("%#v hashes to 0", k)
		}
		if other, dup := seen[k.h]; dup && other != k {
			t.Errorf("%#v and %#v share the hash %x", other, k, k.h)
		}
		seen[k.h] = k
	}
	words := []string{"a", "1", "artist", "size", "512", "page", "user", "42", "type", "avatar"}
	for _, x := range words {
		for _, y := range words {
			add(NewKey(x, y))
			for _, z := range words {
				add(NewKey(x, y).With(x, y))
				add(NewKey(x, y).With(y, z))
				add(NewKey(x, y).With(z, x))
			}
		}
	}
}

// TestKeyStringInjective builds keys that a naive join would confuse and checks that no two share a
// String, and that no entity/id part could act as a Redis glob.
func TestKeyStringInjective(t *testing.T) {
	pairs := [][2]string{
		{"artist", "12"}, {"artist", "123"}, {"artist", "1"}, {"artist", "*"}, {"artist", "?"},
		{"artist", "a:b"}, {"artist:a", "b"}, {"artist", "a:b:c"}, {"artist:a:b", "c"}, {"artist:a", "b:c"},
		{"artist", "a%3Ab"}, {"artist", "%"}, {"artist", "%25"}, {"artist", "[x]"}, {"artist", `\`},
		{"artist", "a b"}, {"artist", "a%20b"}, {"artist", "{x}"}, {"artist", ":"}, {"artist", "::"},
		{"a", ":b"}, {"a:", "b"}, {"artist", "ABC"}, {"artist", "abc"},
	}
	seen := map[string]Key{}
	for _, p := range pairs {
		for _, k := range []Key{NewKey(p[0], p[1]), NewKey(p[0], p[1]).With("size", "256")} {
			if err := k.Err(); err != nil {
				t.Fatalf("NewKey(%q, %q).Err() = %v, want nil", p[0], p[1], err)
			}
			s := k.String()
			if other, ok := seen[s]; ok {
				t.Errorf("got String() %q for both %#v and %#v, want different", s, k, other)
			}
			seen[s] = k
			fields := strings.Split(s, ":")
			if got, want := len(fields), 3; got != want {
				t.Errorf("%q: got %d fields, want %d", s, got, want)
				continue
			}
			if i := strings.IndexAny(fields[0]+fields[1], `*?[]\`); i >= 0 {
				t.Errorf("%q: got a glob character in the entity/id part, want none", s)
			}
			e, ok1 := unescape(fields[0])
			id, ok2 := unescape(fields[1])
			if !ok1 || !ok2 || e != k.Entity() || id != k.ID() {
				t.Errorf("unescape(%q), unescape(%q): got %q %v, %q %v, want %q, %q",
					fields[0], fields[1], e, ok1, id, ok2, k.Entity(), k.ID())
			}
		}
	}
}

func TestKeyAccessors(t *testing.T) {
	k := NewKey(" Artist\u00a0", " Id-42 ").With("size", "256")
	if got, want := k.Entity(), "artist"; got != want {
		t.Errorf("Entity() = %q, want %q", got, want)
	}
	if got, want := k.ID(), " Id-42 "; got != want {
		t.Errorf("ID() = %q, want %q", got, want)
	}
	if got, want := k.Valid(), true; got != want {
		t.Errorf("Valid() = %v, want %v", got, want)
	}
	var zero Key
	if got, want := zero.Entity()+zero.ID(), ""; got != want {
		t.Errorf("zero Key Entity()+ID() = %q, want %q", got, want)
	}
}

func TestKeyInvalid(t *testing.T) {
	long := strings.Repeat("x", MaxKeyLen)
	tests := []struct {
		name string
		key  Key
		want string // substring of the error
	}{
		{"zero Key", Key{}, "zero Key"},
		{"empty entity", NewKey("", "1"), "empty entity"},
		{"blank entity", NewKey("   ", "1"), "empty entity"},
		{"empty id", NewKey("artist", ""), "empty id"},
		{"NUL in entity", NewKey("art\x00ist", "1"), "control character"},
		{"newline in entity", NewKey("art\nist", "1"), "control character"},
		{"DEL in entity", NewKey("art\x7fist", "1"), "control character"},
		{"NUL in id", NewKey("artist", "1\x002"), "control character"},
		{"newline in id", NewKey("artist", "1\n"), "control character"},
		{"tab in id", NewKey("artist", "\t1"), "control character"},
		{"C1 control in id", NewKey("artist", "1\u0085"), "control character"},
		{"invalid UTF-8 id", NewKey("artist", "\xff"), "UTF-8"},
		{"NUL in name", NewKey("artist", "1").With("si\x00ze", "1"), "control character"},
		{"NUL in value", NewKey("artist", "1").With("size", "25\x006"), "control character"},
		{"ESC in value", NewKey("artist", "1").With("size", "\x1b[1m"), "control character"},
		{"invalid UTF-8 value", NewKey("artist", "1").With("size", "\xff"), "UTF-8"},
		{"empty name", NewKey("artist", "1").With("", "1"), "empty after normalisation"},
		{"separator-only name", NewKey("artist", "1").With("_-. ", "1"), "empty after normalisation"},
		{"id over MaxKeyLen", NewKey("artist", long), "longer than"},
		{"id just over MaxKeyLen", NewKey("a", long[:MaxKeyLen-1]), "longer than"},
		{"parameters over MaxKeyLen", NewKey("a", "1").With("v", long[:MaxKeyLen/2]).With("w", long[:MaxKeyLen/2]), "longer than"},

		// Control characters that trimming or name normalisation currently removes before the check:
		// keys.go checks the normalised entity/name/value, not what the caller passed.
		{"trailing newline in entity", NewKey("artist\n", "1"), "control character"},
		{"tab in name", NewKey("artist", "1").With("user\tid", "1"), "control character"},
		{"trailing newline in name", NewKey("artist", "1").With("size\n", "1"), "control character"},
		{"trailing newline in value", NewKey("artist", "1").With("size", "256\n"), "control character"},
		// Invalid UTF-8 that strings.ToLower / normName turn into U+FFFD before the UTF-8 check, so that
		// "\xff" and "\xfe" silently become one entity (one name).
		{"invalid UTF-8 entity", NewKey("\xff", "1"), "UTF-8"},
		{"invalid UTF-8 name", NewKey("artist", "1").With("\xff", "1"), "UTF-8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.key.Err()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Err() = %v, want an error containing %q", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "imgcache: invalid key: ") {
				t.Errorf("got error %q, want the prefix %q", err, "imgcache: invalid key: ")
			}
			if tt.key.Valid() {
				t.Errorf("Valid() = true, want false")
			}
			if got, want := tt.key.Entity()+tt.key.ID(), ""; got != want {
				t.Errorf("Entity()+ID() = %q, want %q", got, want)
			}
			if s := tt.key.String(); !strings.HasPrefix(s, "!invalid(") {
				t.Errorf("String() = %q, want the prefix %q", s, "!invalid(")
			}
			// An invalid key stays invalid, with the same reason, whatever is added to it.
			more := tt.key.With("type", "avatar").With("size", "1")
			if got, want := more.Err(), err; got == nil || got.Error() != want.Error() {
				t.Errorf("after With: got %v, want %v", got, want)
			}
		})
	}
}

func TestKeyZeroErrIs(t *testing.T) {
	var k Key
	if got, want := k.Err(), errZeroKey; !errors.Is(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if got, want := k.String(), "!invalid(zero Key)"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestKeyMaxLenBoundary: the canonical form "entity NUL id ..." may be exactly MaxKeyLen bytes.
func TestKeyMaxLenBoundary(t *testing.T) {
	id := strings.Repeat("x", MaxKeyLen-2) // "a" + NUL + id
	if err := NewKey("a", id).Err(); err != nil {
		t.Errorf("key of exactly MaxKeyLen: got %v, want nil", err)
	}
	if err := NewKey("a", id+"x").Err(); err == nil {
		t.Errorf("key of MaxKeyLen+1: got nil, want an error")
	}
	// A parameter: "a" NUL "1" NUL "n" NUL value.
	base := NewKey("a", "1")
	value := strings.Repeat("v", MaxKeyLen-len("a\x001\x00n\x00"))
	if err := base.With("n", value).Err(); err != nil {
		t.Errorf("With to exactly MaxKeyLen: got %v, want nil", err)
	}
	if err := base.With("n", value+"v").Err(); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("With to MaxKeyLen+1: got %v, want an error saying it is longer than %d", err, MaxKeyLen)
	}
	// A huge value is refused before a buffer for it is made.
	huge := strings.Repeat("v", 16<<20)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	k := base.With("n", huge)
	runtime.ReadMemStats(&after)
	if k.Valid() {
		t.Error("With of a 16 MiB value made a valid key")
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
		t.Errorf("With of a 16 MiB value allocated %d bytes before refusing it", got)
	}
}

func TestNormName(t *testing.T) {
	tests := []struct{ in, want string }{
		{"userID", "userid"},
		{"user_id", "userid"},
		{"User-Id", "userid"},
		{"user.id", "userid"},
		{" user id ", "userid"},
		{"SIZE", "size"},
		{"_-. ", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if got := normName(tt.in); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestUnescape(t *testing.T) {
	tests := []struct {
		in     string
		want   string
		wantOK bool
	}{
		{"abc", "abc", true},
		{"", "", true},
		{"%3A", ":", true},
		{"a%25b", "a%b", true},
		{"%2A%3F%5B%5D%5C", `*?[]\`, true},
		{"%3a", "", false}, // lower-case hex is never written
		{"%41", "", false}, // 'A' is never escaped
		{"%", "", false},
		{"%3", "", false},
		{"a%3", "", false},
		{"%ZZ", "", false},
		{"a:b", "", false},
		{"*", "", false},
		{"a b", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, ok := unescape(tt.in)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("got %q, %v, want %q, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
	// Every byte round-trips through appendEscaped.
	for c := 0; c < 256; c++ {
		s := "a" + string([]byte{byte(c)}) + "z"
		got, ok := unescape(string(appendEscaped(nil, s)))
		if !ok || got != s {
			t.Errorf("byte %#02x: got %q, %v, want %q, true", c, got, ok, s)
		}
	}
}
