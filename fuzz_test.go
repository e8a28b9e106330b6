package imgcache

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// FuzzKey checks the Redis key format and its injectivity on arbitrary input.
func FuzzKey(f *testing.F) {
	f.Add("artist", "123", "size", "256", "type", "avatar")
	f.Add(" Artist ", "12", "userID", "1", "user_id", "2")
	f.Add("artist:a", "b", "User-Id", "x", "type", "")
	f.Add("artist", "a:b", "x", "*", "y", "?")
	f.Add("a", "*", "[", "]", `\`, "{}")
	f.Add("a", "%41", "n", "v", "N", "V")
	f.Add("a", "%", "%", "%25", "%3A", ":")
	f.Add("ÄRTIST", "Björk", "größe", "ß", "Ärger", "ü")
	f.Add("\xff", "1", "\xfe", "v", "n", "v")
	f.Add("a", "1\n", "n\t", "v", "n2", "v2\x00")
	f.Add("", "", "", "", "", "")
	f.Add("a", strings.Repeat("i", MaxKeyLen-10), "n", "v", "m", "w")
	f.Fuzz(func(t *testing.T, entity, id, n1, v1, n2, v2 string) {
		k := NewKey(entity, id).With(n1, v1).With(n2, v2)
		if err := k.Err(); err != nil {
			if k.Valid() || k.Entity() != "" || k.ID() != "" || !strings.HasPrefix(k.String(), "!invalid(") {
				t.Fatalf("invalid key %#v (%v): got Valid %v, Entity %q, ID %q", k, err, k.Valid(), k.Entity(), k.ID())
			}
			return
		}
		checkKeyString(t, k)

		// Normalising again changes nothing.
		if again := NewKey(k.Entity(), k.ID()).With(n1, v1).With(n2, v2); again != k {
			t.Fatalf("rebuilt from Entity()/ID(): got %#v, want %#v", again, k)
		}
		// Parameters in the other order give the same key, unless both have one name (last wins).
		if normName(n1) != normName(n2) {
			if swapped := NewKey(entity, id).With(n2, v2).With(n1, v1); swapped != k {
				t.Fatalf("With in the other order: got %#v, want %#v", swapped, k)
			}
		}
		// Different keys have different strings, equal keys equal strings.
		for _, other := range []Key{
			NewKey(entity, id+"x").With(n1, v1).With(n2, v2),
			NewKey(entity, id[:len(id)/2]).With(n1, v1).With(n2, v2),
			NewKey(entity+"x", id).With(n1, v1).With(n2, v2),
			NewKey(entity, id+":"+n1).With(n2, v2),
			NewKey(entity+":"+id, n1).With(n2, v2),
			NewKey(entity, id).With(n1, v1+"x").With(n2, v2),
			NewKey(entity, id).With(n1, v1).With(n2, v2+"x"),
			NewKey(entity, id).With(n1, v1),
			NewKey(entity, id).With(n1+"x", v1).With(n2, v2),
			NewKey(entity, id),
		} {
			if other.Err() != nil {
				continue
			}
			checkKeyString(t, other)
			s1, s2 := k.String(), other.String()
			if (k == other) != (s1 == s2) {
				t.Fatalf("keys %#v and %#v: got == %v, equal strings %v; want the same", k, other, k == other, s1 == s2)
			}
			if s1 == s2 && (k.Entity() != other.Entity() || k.ID() != other.ID()) {
				t.Fatalf("entity/id %q/%q and %q/%q: got one String %q, want different",
					k.Entity(), k.ID(), other.Entity(), other.ID(), s1)
			}
		}
	})
}

// checkKeyString checks the shape of a valid key's String.
func checkKeyString(t *testing.T, k Key) {
	t.Helper()
	s := k.String()
	fields := strings.Split(s, ":")
	if len(fields) != 3 {
		t.Fatalf("String() = %q: got %d ':'-separated fields, want 3", s, len(fields))
	}
	if h := fields[2]; len(h) != 16 || strings.Trim(h, "0123456789abcdef") != "" {
		t.Fatalf("String() = %q: got hash %q, want 16 lower-case hex digits", s, h)
	}
	if i := strings.IndexAny(fields[0]+fields[1], "*?[]\\{}"); i >= 0 {
		t.Fatalf("String() = %q: got a glob or hash-tag character in the entity/id part, want none", s)
	}
	e, ok1 := unescape(fields[0])
	id, ok2 := unescape(fields[1])
	if !ok1 || !ok2 || e != k.Entity() || id != k.ID() {
		t.Fatalf("String() = %q: unescaped to %q %v, %q %v, want %q, %q", s, e, ok1, id, ok2, k.Entity(), k.ID())
	}
	if p := entityPrefix(k.Entity(), k.ID()); !strings.HasPrefix(s, p) {
		t.Fatalf("String() = %q: got no prefix %q, want it", s, p)
	}
}

// FuzzEnvelope checks decodeEnvelope against arbitrary bytes.
func FuzzEnvelope(f *testing.F) {
	const maxSize = 64
	f.Add(appendHeader(nil, testCodec, false, 1_700_000_000_000, stamp{}))
	f.Add(append(appendHeader(nil, testCodec, false, 1, stamp{}), "payload"...))
	f.Add(appendHeader(nil, testCodec, true, -1, stamp{}))
	f.Add(append(appendHeader(nil, testCodec, true, 0, stamp{}), 'x'))
	f.Add(append(appendHeader(nil, testCodec+1, false, 0, stamp{}), "p"...))
	f.Add(envBytes(0xC1, 1, 0x82, testCodec, 0, ""))
	f.Add(envBytes(0xC1, 2, 0, testCodec, 0, ""))
	f.Add([]byte{0xC1, 1, 0})
	f.Add(append(appendHeader(nil, testCodec, false, 5, stamp{entityGen: 1 << 40, tags: []tagGen{{"artist:1", 7}, {"t", 0}}}), "p"...))
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0xC1}, maxSize+1))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Decode with a fixed codec id, and with the id the data names, to reach the later checks.
		codecs := []uint32{testCodec}
		if len(data) >= 7 {
			codecs = append(codecs, uint32(data[3])<<24|uint32(data[4])<<16|uint32(data[5])<<8|uint32(data[6]))
		}
		for _, codec := range codecs {
			env, err := decodeEnvelope(data, codec, maxSize)
			if len(data) > maxSize && !errors.Is(err, errEnvSize) {
				t.Fatalf("%d bytes over maxSize %d: got error %v, want %v", len(data), maxSize, err, errEnvSize)
			}
			if err != nil {
				switch err {
				case errEnvShort, errEnvMagic, errEnvVersion, errEnvFlags, errEnvCodec, errEnvSize, errEnvNegBody, errEnvStamp:
				default:
					t.Fatalf("got unexpected error %v", err)
				}
				if env.negative || env.expiryMs != 0 || env.payload != nil {
					t.Fatalf("got envelope %+v with error %v, want the zero envelope", env, err)
				}
				continue
			}
			if len(env.payload) > len(data) {
				t.Fatalf("got a payload of %d bytes from %d bytes of input", len(env.payload), len(data))
			}
			if env.negative && len(env.payload) != 0 {
				t.Fatalf("got a negative envelope with %d bytes of payload", len(env.payload))
			}
			// Re-encode what was decoded, stamp included, and decode it again: the same envelope.
			// (Byte equality would be too strict: uvarints have overlong spellings.)
			st := stamp{entityGen: env.entityGen}
			env.eachTag(func(tag []byte, gen uint64) { st.tags = append(st.tags, tagGen{string(tag), gen}) })
			again := append(appendHeader(nil, codec, env.negative, env.expiryMs, st), env.payload...)
			env2, err := decodeEnvelope(again, codec, len(again))
			if err != nil {
				t.Fatalf("re-encoded envelope does not decode: %v", err)
			}
			var tags2 []tagGen
			env2.eachTag(func(tag []byte, gen uint64) { tags2 = append(tags2, tagGen{string(tag), gen}) })
			if env2.negative != env.negative || env2.expiryMs != env.expiryMs || env2.entityGen != env.entityGen ||
				fmt.Sprint(tags2) != fmt.Sprint(st.tags) || !bytes.Equal(env2.payload, env.payload) {
				t.Fatalf("re-encoded: got %+v, want %+v", env2, env)
			}
		}
	})
}

// FuzzImageMetaUnmarshal checks ImageMeta.UnmarshalBinary against arbitrary bytes.
func FuzzImageMetaUnmarshal(f *testing.F) {
	for _, m := range []ImageMeta{
		{},
		realisticMeta(),
		{Path: "/ü.png", Size: -1, Width: -2, Height: 1 << 40, ModTime: time.Unix(-1, 999_999_999)},
		{ETag: `W/"x"`, ModTime: time.Date(9999, 12, 31, 0, 0, 0, 0, time.FixedZone("X", 3600))},
	} {
		data, err := m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
		f.Add(data[:len(data)/2])
		f.Add(append(bytes.Clone(data), 0))
	}
	f.Add([]byte{})
	f.Add([]byte{2})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add(metaBytes(1, [4]string{"a", "b", "c", "d"}, [5]int64{1, 2, 3, 4, 1e9}))
	f.Add([]byte{1, 0x80, 0x00, 0, 0, 0, 0, 0, 0, 0, 0}) // a non-minimal uvarint
	f.Fuzz(func(t *testing.T, data []byte) {
		var m ImageMeta
		if err := m.UnmarshalBinary(data); err != nil {
			return
		}
		if n := len(m.Path) + len(m.MIMEType) + len(m.ETag) + len(m.Source); n > len(data) {
			t.Fatalf("got %d bytes of strings from %d bytes of input", n, len(data))
		}
		if loc := m.ModTime.Location(); loc != time.UTC {
			t.Fatalf("ModTime location: got %v, want UTC", loc)
		}
		again, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("MarshalBinary of a decoded value: got %v, want nil", err)
		}
		if len(again) > len(data) {
			t.Fatalf("re-encoded: got %d bytes, want at most the input's %d", len(again), len(data))
		}
		var m2 ImageMeta
		if err := m2.UnmarshalBinary(again); err != nil {
			t.Fatalf("UnmarshalBinary of re-encoded % x: got %v, want nil", again, err)
		}
		if !sameImageMeta(m2, m) {
			t.Fatalf("round trip: got %+v, want %+v", m2, m)
		}
	})
}
