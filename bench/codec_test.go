package bench

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/imgcache/imgcache/bench/codec"
	"github.com/vmihailenco/msgpack/v5"
)

// BenchmarkCodec sets ImageMeta's hand-written binary form (imgcache's default codec for it) beside
// msgp-generated code, encoding/json and vmihailenco/msgpack reflection (go-redis/cache's codec,
// here without the s2 compression go-redis/cache adds to values of 64 bytes and more), all on one
// value. Rows are BenchmarkCodec/<codec>/{encode,decode}; "bytes" is the encoded size:
//
//	go test -run '^$' -bench Codec -benchmem -count 6 .
func BenchmarkCodec(b *testing.B) {
	m := codecMeta()
	for _, c := range codecs {
		data, err := c.encode(m)
		if err != nil {
			b.Fatalf("%s: encode: %v", c.name, err)
		}
		var got meta
		if err := c.decode(data, &got); err != nil || !sameMeta(got, m) {
			b.Fatalf("%s: round trip: got %+v, %v, want %+v, nil", c.name, got, err, m)
		}
		size := float64(len(data))
		b.Run(c.name+"/encode", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.encode(m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(size, "bytes")
		})
		b.Run(c.name+"/decode", func(b *testing.B) {
			b.ReportAllocs()
			var got meta
			for b.Loop() {
				got = meta{} // as the cache does: every decode starts from a zero V
				if err := c.decode(data, &got); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(size, "bytes")
		})
	}
}

func TestCodecRoundTrip(t *testing.T) {
	cest := time.FixedZone("CEST", 2*60*60)
	values := []struct {
		name string
		m    meta
	}{
		{"benchmark value", codecMeta()},
		{"fixture", Meta(7)},
		{"zero value", meta{}},
		{"non-UTC time", meta{Path: "/a.png", ModTime: time.Date(2023, 7, 1, 23, 30, 0, 1, cest)}},
	}
	for _, c := range codecs {
		for _, v := range values {
			t.Run(c.name+"/"+v.name, func(t *testing.T) {
				data, err := c.encode(v.m)
				if err != nil {
					t.Fatalf("encode: got %v, want nil", err)
				}
				var got meta
				if err := c.decode(data, &got); err != nil {
					t.Fatalf("decode: got %v, want nil", err)
				}
				if !sameMeta(got, v.m) {
					t.Errorf("got %+v, want %+v", got, v.m)
				}
			})
		}
	}
}

// codecs are the encodings compared, each behind the same func signatures so that every row pays
// the same indirect call. The msgp rows convert to the generated types for free (same fields).
var codecs = []struct {
	name   string
	encode func(meta) ([]byte, error)
	decode func([]byte, *meta) error
}{
	{"binary", meta.MarshalBinary, func(b []byte, m *meta) error { return m.UnmarshalBinary(b) }},
	{"msgp-map",
		func(m meta) ([]byte, error) { return (*codec.ImageMeta)(&m).MarshalMsg(nil) },
		func(b []byte, m *meta) error { _, err := (*codec.ImageMeta)(m).UnmarshalMsg(b); return err }},
	{"msgp-tuple",
		func(m meta) ([]byte, error) { return (*codec.ImageMetaTuple)(&m).MarshalMsg(nil) },
		func(b []byte, m *meta) error { _, err := (*codec.ImageMetaTuple)(m).UnmarshalMsg(b); return err }},
	{"json",
		func(m meta) ([]byte, error) { return json.Marshal(m) },
		func(b []byte, m *meta) error { return json.Unmarshal(b, m) }},
	{"msgpack",
		func(m meta) ([]byte, error) { return msgpack.Marshal(m) },
		func(b []byte, m *meta) error { return msgpack.Unmarshal(b, m) }},
}

// codecMeta is the value the root package's BenchmarkCodec encodes (codec_test.go, realisticMeta):
// an artist avatar with every field set, Source included.
func codecMeta() meta {
	return meta{
		Path:     "/srv/images/artists/123/avatar.webp",
		Size:     48213,
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     `"5d41402abc4b2a76b9719d911017c592"`,
		ModTime:  time.Date(2024, 3, 14, 15, 9, 26, 535897932, time.UTC),
		Source:   "https://artwork.example.com/v1/artists/123/original.jpg?size=large",
	}
}

// sameMeta compares every field, ModTime with Equal: the codecs differ in the zone they return.
func sameMeta(a, b meta) bool {
	return a.Path == b.Path && a.Size == b.Size && a.MIMEType == b.MIMEType && a.Width == b.Width &&
		a.Height == b.Height && a.ETag == b.ETag && a.ModTime.Equal(b.ModTime) && a.Source == b.Source
}
