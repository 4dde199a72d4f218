import { useEffect, useState } from 'react';
import { tomlLiteral, parseLiteral } from './pipeline.js';

// One parameter's control, chosen from its specification: a choice → select, an integer or
// number with a range → slider and number field (a number field alone when the range is wide),
// a boolean → checkbox, a list of strings → list editor, a table or any value → a TOML literal,
// anything else → text. An empty control means "not set" (the default applies).
export default function ParamControl({ name, spec, value, onChange, errors, missing }) {
  const id = `param-${name}`;
  const label = (
    <span className="param-label">
      {name}
      {spec.required && <span className="req">*</span>}
      {spec.default !== undefined && spec.default !== null && (
        <span className="default"> (default {JSON.stringify(spec.default)})</span>
      )}
    </span>
  );
  let control;
  const type = spec.type;
  if (Array.isArray(spec.enum) && spec.enum.length) {
    control = (
      <select id={id} value={value ?? ''} onChange={(e) => onChange(e.target.value === '' ? undefined : e.target.value)}>
        <option value="">{spec.required ? '(choose)' : '(default)'}</option>
        {spec.enum.map((o) => (
          <option key={String(o)} value={o}>
            {String(o)}
          </option>
        ))}
      </select>
    );
  } else if (type === 'integer' || type === 'number') {
    const num = (text) => {
      if (text === '') return undefined;
      const n = Number(text);
      return Number.isNaN(n) ? undefined : n;
    };
    const slider = spec.min !== null && spec.min !== undefined && spec.max !== null && spec.max !== undefined && spec.max - spec.min <= 4096;
    control = (
      <span className="number">
        {slider && (
          <input
            type="range"
            min={spec.min}
            max={spec.max}
            step={type === 'integer' ? 1 : 'any'}
            value={value ?? spec.default ?? spec.min}
            onChange={(e) => onChange(num(e.target.value))}
            aria-label={`${name} slider`}
          />
        )}
        <input
          id={id}
          type="number"
          min={spec.min ?? undefined}
          max={spec.max ?? undefined}
          step={type === 'integer' ? 1 : 'any'}
          value={value ?? ''}
          onChange={(e) => onChange(num(e.target.value))}
        />
      </span>
    );
  } else if (type === 'boolean') {
    control = (
      <input id={id} type="checkbox" checked={value ?? spec.default ?? false} onChange={(e) => onChange(e.target.checked)} />
    );
  } else if (type === 'string_list') {
    control = <ListEditor id={id} value={Array.isArray(value) ? value : []} onChange={(v) => onChange(v.length ? v : undefined)} />;
  } else if (type === 'table' || type === 'value') {
    control = <LiteralField id={id} value={value} onChange={onChange} example={spec.example} />;
  } else {
    control = (
      <input
        id={id}
        type="text"
        value={value ?? ''}
        placeholder={spec.example !== undefined && spec.example !== null ? String(spec.example) : ''}
        onChange={(e) => onChange(e.target.value === '' ? undefined : e.target.value)}
      />
    );
  }
  return (
    <div className={`field param${errors.length ? ' invalid' : ''}${missing ? ' missing' : ''}`} data-param={name}>
      <label htmlFor={id}>{label}</label>
      {control}
      <small className="help">{spec.description}</small>
      {missing && <small className="missing">required</small>}
      {errors.map((e, i) => (
        <small className="param-error" key={i}>
          {e.message}
        </small>
      ))}
    </div>
  );
}

function ListEditor({ id, value, onChange }) {
  return (
    <div className="list-editor" id={id}>
      {value.map((item, i) => (
        <div key={i} className="list-row">
          <input
            type="text"
            value={item}
            aria-label={`item ${i + 1}`}
            onChange={(e) => onChange(value.map((x, j) => (j === i ? e.target.value : x)))}
          />
          <button type="button" onClick={() => onChange(value.filter((_, j) => j !== i))} aria-label="remove">
            ×
          </button>
        </div>
      ))}
      <button type="button" className="add" onClick={() => onChange([...value, ''])}>
        + add
      </button>
    </div>
  );
}

function LiteralField({ id, value, onChange, example }) {
  const [text, setText] = useState(tomlLiteral(value));
  const [bad, setBad] = useState(null);
  useEffect(() => setText(tomlLiteral(value)), [value]);
  const commit = () => {
    if (text.trim() === '') {
      setBad(null);
      onChange(undefined);
      return;
    }
    try {
      onChange(parseLiteral(text));
      setBad(null);
    } catch (e) {
      setBad(e.message.split('\n')[0]);
    }
  };
  return (
    <>
      <input
        id={id}
        type="text"
        className="literal"
        value={text}
        placeholder={example !== undefined && example !== null ? tomlLiteral(example) : 'a TOML value'}
        onChange={(e) => setText(e.target.value)}
        onBlur={commit}
        onKeyDown={(e) => e.key === 'Enter' && commit()}
      />
      {bad && <small className="param-error">not TOML: {bad}</small>}
    </>
  );
}
