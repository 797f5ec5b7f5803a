// Command gotmpl renders an Ollama Modelfile TEMPLATE with Go's own text/template, the engine Ollama uses.
//
// Input on stdin, JSON: {"template": "...", "messages": [{"role": "system|user|assistant", "content": "..."}]}.
// Output on stdout: the rendered prompt, byte for byte.
//
// The values are built as Ollama's template.Execute builds them for a template that uses .Messages: consecutive
// messages of the same role are joined with "\n\n" (collate), .System is every system message joined with "\n\n",
// and .Messages keeps the system messages too (Ollama's chat path for templates that range over .Messages, which
// every template of this toolkit does).
// Fields are struct fields, not map keys: a missing map key would render as "<no value>", a struct field cannot.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role      string
	Content   string
	Thinking  string
	ToolName  string
	ToolCalls []any
	Images    []any
}

type Values struct {
	System     string
	Prompt     string
	Response   string
	Suffix     string
	Messages   []Message
	Tools      []any
	Think      bool
	ThinkLevel string
	IsThinkSet bool
}

type input struct {
	Template string `json:"template"`
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
}

// Ollama's extra template functions; the templates under test must not depend on them, so they are inert here.
var funcs = template.FuncMap{
	"json":             func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate":      func(...string) string { return "" },
	"yesterdayDate":    func(...string) string { return "" },
	"toTypeScriptType": func(v any) string { return "" },
}

func collate(in input) (string, []Message) {
	var system []string
	var out []Message
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, Message{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(1)
	}
	t, err := template.New("").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(1)
	}
	system, msgs := collate(in)
	var out bytes.Buffer
	if err := t.Execute(&out, Values{System: system, Messages: msgs}); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(1)
	}
	os.Stdout.Write(out.Bytes())
}
